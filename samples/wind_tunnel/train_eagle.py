"""Train a 1-layer EAGLE draft head for the wind-tunnel target (export/modeling_eagle.py format).

The frozen target (fp32, the shipped fp16 weights) runs once over a subset of the train split to
get its features f (the `hidden` output: the LM head's input) and its greedy tokens. The head then
learns the standard EAGLE pairing: row i reads (token x[i+1], feature f[i]) and predicts x[i+2]
(as a label: the target's greedy token there, which is what greedy verification accepts), with
its output `out` regressed onto f[i+1] (which a deeper draft level feeds back as the feature).
The head shares the target's embedding and LM head (frozen, not stored): it holds fc, the two
input norms and one decoder layer shaped like the target's.

Usage: python samples/wind_tunnel/train_eagle.py [--out ~/.cache/edgecpm/wind_tunnel] [--threads 1]
       python samples/wind_tunnel/train_eagle.py --time-steps 5   # only time a few steps
       python samples/wind_tunnel/train_eagle.py --measure        # only the shipped head's acceptance
Writes samples/wind_tunnel/eagle/{config.json,model.safetensors,train_log.json}; the target's
features are cached in the --out folder (~270 MB) so that reruns skip their extraction.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from make_corpus import DEFAULT_OUT, DOC_SEPARATOR
from safetensors.torch import save_file
from train import SEED, batch_order, init_weights, load_shipped, param_groups, token_stream, windows, wsd_lr

from edgecpm.config import ModelConfig
from edgecpm.export.modeling_eagle import EagleHead, load_eagle
from edgecpm.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
TRAIN_WINDOWS = 2000  # 512k train tokens (28% of the split) of target features, fp16 in memory
STEPS, BATCH_SIZE, PEAK_LR = 1500, 8, 1e-2  # 6 epochs over the subset; WSD schedule and muP lrs as in train.py
REG_WEIGHT = 1.0  # loss = CE(logits_i, target's greedy token at i+1) + REG_WEIGHT * smooth_l1((out_i - f[i+1]) / s)
FEATURE_NOISE = 0.05  # EAGLE's input augmentation: N(0, 0.05) * rms(f) added to the input features
LOG_EVERY = 10
HELDOUT_WINDOWS = 64


def head_config(target_cfg: dict) -> dict:
    """The target's config.json as the head's: one layer whose residual scale equals the target's
    layers' (mup_denominator = the target's depth)."""
    return {**target_cfg, "_name_or_path": "edgecpm/wind-tunnel-eagle", "architectures": ["EagleMiniCPMForCausalLM"],
            "num_hidden_layers": 1, "mup_denominator": target_cfg["num_hidden_layers"]}


@torch.no_grad()
def extract_features(target, data: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """For windows data[:, :L] (L = window - 1), fp32 forward: the target's `hidden` rows [N, L, H]
    (kept as fp16) and its greedy next tokens [N, L] (argmax of its logits)."""
    feats = torch.empty(len(data), data.shape[1] - 1, target.config.hidden_size, dtype=torch.float16)
    greedy = torch.empty(len(data), data.shape[1] - 1, dtype=torch.int64)
    for i in range(0, len(data), batch_size):
        out = target(data[i : i + batch_size, :-1])
        feats[i : i + batch_size], greedy[i : i + batch_size] = out.hidden.half(), out.logits.argmax(-1)
    return feats, greedy


def head_loss(head: EagleHead, ids: torch.Tensor, f: torch.Tensor, greedy: torch.Tensor, scale: float,
              noise: float = 0.0):
    """(classification loss, regression loss, top-1 agreement with the target) on a batch of
    windows: ids [B, L+1], target features f [B, L, H] and greedy tokens [B, L]. Row i < L-1
    reads (x[i+1], f[i]); its logits learn the target's greedy token at i+1 (what greedy
    verification accepts) and its `out` regresses onto f[i+1] (EAGLE-1's smooth L1, on features
    divided by `scale`, their rms, so they are of order 1)."""
    B, L = f.shape[:2]
    f = f.float()
    feat_in, feat_next, want = f[:, :-1], f[:, 1:], greedy[:, 1:].flatten()
    if noise:  # EAGLE's input augmentation
        feat_in = feat_in + noise * scale * torch.randn_like(feat_in)
    mask = torch.ones(L - 1, L - 1, dtype=torch.bool).tril()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = head(ids[:, 1:L], torch.arange(L - 1).expand(B, -1), mask, hidden_in=feat_in)
    logits = res.logits.flatten(0, 1)
    ce = F.cross_entropy(logits, want)
    reg = F.smooth_l1_loss(res.hidden.float() / scale, feat_next / scale)
    agree = (logits.argmax(-1) == want).float().mean()
    return ce, reg, agree


@torch.no_grad()
def evaluate(head, ids, feats, greedy, scale) -> dict:
    """Held-out losses and top-1 agreement with the target given its true features (the first
    draft token's acceptance rate)."""
    head.eval()
    parts = [head_loss(head, ids[i : i + 16], feats[i : i + 16], greedy[i : i + 16], scale)
             for i in range(0, len(ids), 16)]
    head.train()
    ce, reg, agree = (float(torch.stack(x).mean()) for x in zip(*parts, strict=True))
    return {"ce": ce, "reg": reg, "top1_agree": agree}


def acceptance(folder: Path, heldout_text: str, n_prompts: int = 8, depth: int = 4) -> dict:
    """Greedy speculative decoding with the exported head (onnxruntime, depth-`depth` chain) on the
    first 128 tokens of held-out documents (benchmarks/speculative.py's picks), 96 new tokens each:
    mean tokens per target step, and whether the output equals plain greedy decoding."""
    import tempfile

    import edgecpm
    from edgecpm.drafters import SpecConfig
    from edgecpm.export.exporter import export_bundle

    docs = [d for d in heldout_text.split(DOC_SEPARATOR) if len(d) > 2000]
    picks = sorted(np.random.default_rng(0).choice(len(docs), size=n_prompts, replace=False))
    with tempfile.TemporaryDirectory() as tmp:
        target = export_bundle(HERE / "target", Path(tmp) / "target", progress=False)
        head = export_bundle(folder, Path(tmp) / "eagle", eagle_of=HERE / "target", progress=False)
        plain = edgecpm.Session(target, threads=1)
        spec = edgecpm.Session(target, draft=SpecConfig(draft=str(head), depth=depth, tree_size=depth), threads=1)
        steps, same = [], True
        for i in picks:
            ids = plain.tokenizer.encode(docs[i])[:128]
            g = spec.generate(ids, max_new_tokens=96, ignore_eos=True)
            same &= g.token_ids == plain.generate(ids, max_new_tokens=96, ignore_eos=True).token_ids
            steps.append(g.stats["accepted_per_step"])
    return {"prompts": n_prompts, "depth": depth, "accepted_per_step": float(np.mean(steps)),
            "per_prompt": steps, "identical_to_plain": bool(same)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache folder (default: {DEFAULT_OUT})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--time-steps", type=int, default=None, metavar="N", help="only time N steps (nothing saved)")
    ap.add_argument("--no-compile", action="store_true", help="eager training (no C++ compiler available)")
    ap.add_argument("--measure", action="store_true", help="only measure the shipped head's acceptance")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = args.out.expanduser()
    heldout_text = (root / "corpus/heldout.txt").read_text(encoding="utf-8")
    if args.measure:  # the result also replaces the one in eagle/train_log.json
        result = acceptance(HERE / "eagle", heldout_text)
        print(json.dumps(result, indent=1))
        log_path = HERE / "eagle/train_log.json"
        if log_path.exists():
            log_path.write_text(json.dumps({**json.loads(log_path.read_text()), "acceptance": result}, indent=1) + "\n")
        return
    tok = Tokenizer.from_pretrained(root / "tokenizer")
    target = load_shipped(HERE / "target")
    for p in target.parameters():
        p.requires_grad_(False)

    t0 = time.time()
    train = windows(token_stream(tok, (root / "corpus/train.txt").read_text(encoding="utf-8")))
    heldout = windows(token_stream(tok, heldout_text))
    n_train = args.time_steps * BATCH_SIZE if args.time_steps else TRAIN_WINDOWS
    train = train[torch.from_numpy(np.random.default_rng(SEED).permutation(len(train))[:n_train])]
    heldout = heldout[:: max(1, len(heldout) // HELDOUT_WINDOWS)][:HELDOUT_WINDOWS]
    weights = hashlib.sha256((HERE / "target/model.safetensors").read_bytes()).hexdigest()[:12]
    cache = root / f"eagle_features_{len(train)}_{weights}.pt"  # reruns (other lr, steps) skip the extraction
    if cache.exists():
        saved = torch.load(cache)
    else:
        saved = {"train": extract_features(target, train), "heldout": extract_features(target, heldout)}
        if not args.time_steps:
            torch.save(saved, cache)
    (feats, greedy), heldout_data = saved["train"], (heldout, *saved["heldout"])
    feature_s = time.time() - t0
    scale = float(feats[:64].float().pow(2).mean().sqrt())
    print(f"features of {len(train)} train + {len(heldout)} held-out windows in {feature_s:.0f} s", flush=True)

    cfg_dict = head_config(json.loads((HERE / "target/config.json").read_text()))
    cfg = ModelConfig.for_eagle(cfg_dict, "eagle")
    torch.manual_seed(SEED)
    head = EagleHead(cfg, own_embed=False, own_head=False)
    head.share(target.model.embed_tokens.weight, target.lm_head_weight)
    init_weights(head, cfg)
    opt = torch.optim.AdamW(param_groups(head, cfg), lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8)
    steps = args.time_steps or args.steps
    order = batch_order(len(train), BATCH_SIZE, steps, SEED)
    log = {"config": cfg_dict, "params": sum(p.numel() for p in head.parameters()), "steps": steps,
           "batch_size": BATCH_SIZE, "seq_len": train.shape[1] - 1, "train_windows": len(train), "peak_lr": PEAK_LR,
           "reg_weight": REG_WEIGHT, "feature_rms": scale, "feature_noise": FEATURE_NOISE,
           "threads": args.threads, "compiled": not args.no_compile, "seed": SEED, "torch": torch.__version__,
           "feature_extraction_s": feature_s, "train": [], "heldout": []}
    print(f"head {log['params'] / 1e6:.2f}M params, {steps} steps x {BATCH_SIZE} x {log['seq_len']} tokens", flush=True)
    # torch.compile fuses the head's small elementwise ops: 0.37 -> 0.25 s/step on one thread.
    step_loss = head_loss if args.no_compile else torch.compile(head_loss, dynamic=False)
    start, window = time.time(), []
    for step in range(steps):
        lr = wsd_lr(step, steps, PEAK_LR)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        idx = torch.from_numpy(order[step])
        ce, reg, agree = step_loss(head, train[idx], feats[idx], greedy[idx], scale, FEATURE_NOISE)
        opt.zero_grad(set_to_none=True)
        (ce + REG_WEIGHT * reg).backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        window.append((ce.item(), reg.item(), agree.item()))
        if (step + 1) % LOG_EVERY == 0 or step == steps - 1:
            ce_m, reg_m, agree_m = np.mean(window, axis=0).tolist()
            log["train"].append({"step": step + 1, "ce": ce_m, "reg": reg_m, "top1_agree": agree_m, "lr": lr,
                                 "elapsed_s": time.time() - start})
            print(f"step {step + 1:4d}/{steps}  ce {ce_m:.4f}  reg {reg_m:.4f}  agree {agree_m:.3f}  lr {lr:.2e}  "
                  f"{time.time() - start:.0f} s", flush=True)
            window = []
        if (step + 1) % (steps // 4 or 1) == 0:
            log["heldout"].append({"step": step + 1, **evaluate(head, *heldout_data, scale)})
            print(f"step {step + 1}: held-out {log['heldout'][-1]}", flush=True)
    log["train_wall_s"] = time.time() - start
    print(f"training {log['train_wall_s']:.0f} s ({log['train_wall_s'] / steps:.2f} s/step)")
    if args.time_steps:
        return

    folder = HERE / "eagle"
    folder.mkdir(exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    # Reported numbers: the shipped fp16 head, loaded the way the torch runtime loads it.
    shipped = load_eagle(folder, torch.float32, target)
    log["heldout_shipped"] = evaluate(shipped, *heldout_data, scale)
    log["tensors"] = sorted(state)
    print(f"shipped head, held-out: {log['heldout_shipped']}")
    log["acceptance"] = acceptance(folder, heldout_text)
    print(f"held-out speculative decoding: {log['acceptance']}")
    (folder / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
