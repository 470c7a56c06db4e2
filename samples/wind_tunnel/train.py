"""Train the wind-tunnel target and draft models (MiniCPM4 architecture) on the stdlib corpus.

Both models use the repo's own torch model (edgecpm.export.modeling_minicpm), so what is trained is
exactly what the runtimes load. The step counts below, not the wall clock, fix the result: a rerun
with the same corpus, tokenizer and torch build reproduces it.

Usage: python samples/wind_tunnel/train.py [--out ~/.cache/edgecpm/wind_tunnel]
       python samples/wind_tunnel/train.py --time-steps 5   # only time a few steps of each model
Writes samples/wind_tunnel/{target,draft}/, train_log.json and loss.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from make_corpus import DEFAULT_OUT, DOC_SEPARATOR
from safetensors.torch import load_file, save_file

from edgecpm.config import ModelConfig
from edgecpm.export.modeling_minicpm import MiniCPMForCausalLM
from edgecpm.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent
SEED = 1234
SEQ_LEN = 256
THREADS = 2  # the machine is shared: never more
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
SAMPLE_PROMPTS = ("def ", "import ", "class ", "    return")

# MiniCPM4-8B's LongRoPE factor list (64 entries) linearly resampled to head_dim/2 = 16 entries, so the
# runtimes' factor handling is exercised with realistic, non-trivial values (all-ones would hide bugs).
ROPE_FACTORS = [0.9978, 1.096, 1.3095, 1.7675, 2.7238, 4.6156, 8.0141, 13.083,
                18.9388, 24.0076, 27.4062, 29.2979, 30.2542, 30.7122, 30.9258, 31.0239]

# Architecture and recipe of each model. dim_model_base 64 makes the muP width multiplier 4 (target)
# and 2 (draft), so the logit divisor is not a no-op either.
MODELS = {
    "target": {"hidden_size": 256, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
               "intermediate_size": 768, "batch_size": 8, "steps": 2200, "peak_lr": 1e-2},
    "draft": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
              "intermediate_size": 384, "batch_size": 8, "steps": 1500, "peak_lr": 1e-2},
}
WARMUP_FRACTION = 0.03
DECAY_FRACTION = 0.15  # WSD: the last 15% of steps decay exponentially to 10% of the peak
FINAL_LR_RATIO = 0.1
LOG_EVERY = 10
HELDOUT_EVALS = 4  # held-out loss on a fixed subset this many times during training
HELDOUT_SUBSET_WINDOWS = 32


# ---- data -----------------------------------------------------------------------------------
def token_stream(tok: Tokenizer, text: str) -> np.ndarray:
    """Every document as <s> ids </s>, concatenated in corpus order."""
    eos = tok.token_to_id("</s>")
    ids: list[int] = []
    for doc in text.split(DOC_SEPARATOR):
        ids += tok.encode(doc, add_bos=True) + [eos]
    return np.asarray(ids, dtype=np.int64)


def windows(stream: np.ndarray) -> torch.Tensor:
    """Non-overlapping [N, SEQ_LEN + 1] windows: inputs are [:, :-1], targets [:, 1:]."""
    n = (len(stream) - 1) // SEQ_LEN
    idx = np.arange(n)[:, None] * SEQ_LEN + np.arange(SEQ_LEN + 1)[None, :]
    return torch.from_numpy(stream[idx])


def batch_order(n_windows: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Window indices for every step: consecutive epochs, each a fresh seeded permutation."""
    rng = np.random.default_rng(seed)
    order = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(n_windows).tolist())
    return np.asarray(order[: steps * batch_size]).reshape(steps, batch_size)


# ---- model ----------------------------------------------------------------------------------
def config_json(arch: dict, vocab_size: int, im_end_id: int, name: str) -> dict:
    """config.json in MiniCPM4's format and key set (auto_map omitted: no remote code is shipped)."""
    return {
        "_name_or_path": f"edgecpm/wind-tunnel-{name}",
        "architectures": ["MiniCPMForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": [2, im_end_id],
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": arch["hidden_size"],
        "initializer_range": 0.1,
        "intermediate_size": arch["intermediate_size"],
        "max_position_embeddings": 4096,
        "model_type": "minicpm",
        "num_attention_heads": arch["num_attention_heads"],
        "num_hidden_layers": arch["num_hidden_layers"],
        "num_key_value_heads": arch["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "rope_type": "longrope",
            "long_factor": list(ROPE_FACTORS),
            "short_factor": list(ROPE_FACTORS),
            "original_max_position_embeddings": 4096,
        },
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "scale_emb": 12,
        "scale_depth": 1.4,
        "dim_model_base": 64,
        "tie_word_embeddings": True,
    }


def init_weights(model: MiniCPMForCausalLM, cfg: ModelConfig) -> None:
    """MiniCPM's muP init: every matrix and the embedding ~ N(0, 0.1 / sqrt(width multiplier)),
    RMSNorm weights 1 (as constructed)."""
    std = cfg.raw["initializer_range"] / math.sqrt(cfg.logit_divisor)
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, mean=0.0, std=std)


def param_groups(model: MiniCPMForCausalLM, cfg: ModelConfig) -> list[dict]:
    """muP learning rates: hidden matrices get peak_lr / width multiplier, the (tied) embedding and
    the norms get peak_lr. Weight decay only on hidden matrices."""
    hidden, other = [], []
    for name, p in model.named_parameters():
        (hidden if p.dim() == 2 and "embed_tokens" not in name else other).append(p)
    width = cfg.logit_divisor
    return [
        {"params": hidden, "lr_scale": 1.0 / width, "weight_decay": 0.1},
        {"params": other, "lr_scale": 1.0, "weight_decay": 0.0},
    ]


def wsd_lr(step: int, steps: int, peak: float) -> float:
    """Warmup-Stable-Decay (MiniCPM): linear warmup, constant, then exponential decay to 10%."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    decay_start = round((1 - DECAY_FRACTION) * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < decay_start:
        return peak
    progress = (step - decay_start + 1) / (steps - decay_start)
    return peak * FINAL_LR_RATIO ** progress


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model: MiniCPMForCausalLM, data: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over every target position of `data`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        logits = model(chunk[:, :-1])[0]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    return total / count


def unigram_loss(train_stream: np.ndarray, heldout: torch.Tensor, vocab_size: int) -> float:
    """Add-one-smoothed unigram model of the train tokens, on the same held-out targets."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout[:, 1:].numpy()].mean())


@torch.no_grad()
def greedy(model: MiniCPMForCausalLM, tok: Tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Full-recompute greedy decoding (no KV cache): simple and obviously right."""
    model.eval()
    ids = tok.encode(prompt)
    for _ in range(max_new_tokens):
        next_id = int(model(torch.tensor([ids]))[0][0, -1].argmax())
        if next_id in tok.eos_token_ids:
            break
        ids.append(next_id)
    return tok.decode(ids[1:])


# ---- training -------------------------------------------------------------------------------
def train_one(name: str, spec: dict, tok: Tokenizer, train: torch.Tensor, heldout_subset: torch.Tensor,
              use_compile: bool, time_steps: int | None = None) -> tuple[MiniCPMForCausalLM, dict]:
    cfg_dict = config_json(spec, tok.vocab_size, tok.token_to_id("<|im_end|>"), name)
    cfg = ModelConfig.from_dict(cfg_dict)
    torch.manual_seed(SEED)
    model = MiniCPMForCausalLM(cfg)
    init_weights(model, cfg)
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=spec["peak_lr"], betas=(0.9, 0.95), eps=1e-8)
    steps = time_steps or spec["steps"]
    order = batch_order(len(train), spec["batch_size"], steps, SEED)
    eval_at = {round(steps * (k + 1) / HELDOUT_EVALS) - 1 for k in range(HELDOUT_EVALS - 1)}
    log = {"name": name, "config": cfg_dict, "params": n_params(model), "steps": steps,
           "batch_size": spec["batch_size"], "seq_len": SEQ_LEN, "peak_lr": spec["peak_lr"],
           "train": [], "heldout_subset": []}
    print(f"[{name}] {log['params'] / 1e6:.2f}M params, {steps} steps x {spec['batch_size']} x {SEQ_LEN} tokens")

    def lm_loss(batch: torch.Tensor) -> torch.Tensor:
        # bf16 autocast: ~3x faster matmuls on this CPU (AVX512-BF16); weights, optimizer state and
        # the loss stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])[0]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    # torch.compile fuses the many small elementwise ops (norms, RoPE, muP scalings): ~2x per step.
    step_loss = torch.compile(lm_loss, dynamic=False) if use_compile else lm_loss

    start, window_loss = time.time(), []
    for step in range(steps):
        lr = wsd_lr(step, steps, spec["peak_lr"])
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        loss = step_loss(train[torch.from_numpy(order[step])])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window_loss.append(loss.item())
        if step == 0:
            log["first_step_s"] = time.time() - start  # includes compilation
        if (step + 1) % LOG_EVERY == 0 or step == steps - 1:
            mean = sum(window_loss) / len(window_loss)
            log["train"].append({"step": step + 1, "loss": mean, "lr": lr, "elapsed_s": time.time() - start})
            print(f"[{name}] step {step + 1:5d}/{steps}  loss {mean:.4f}  lr {lr:.2e}  "
                  f"{time.time() - start:.0f} s", flush=True)
            window_loss = []
        if step in eval_at and not time_steps:
            h = heldout_loss(model, heldout_subset)
            log["heldout_subset"].append({"step": step + 1, "loss": h})
            print(f"[{name}] step {step + 1}: held-out subset loss {h:.4f} (ppl {math.exp(h):.1f})", flush=True)
    log["train_wall_s"] = time.time() - start
    log["s_per_step_after_first"] = (log["train_wall_s"] - log["first_step_s"]) / max(1, steps - 1)
    return model, log


def save_checkpoint(model: MiniCPMForCausalLM, cfg_dict: dict, tokenizer_dir: Path, folder: Path) -> int:
    """fp16 safetensors with Hugging Face names (tied: no lm_head.weight) + config + tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / f, folder / f)
    return sum(p.stat().st_size for p in folder.iterdir())


def load_shipped(folder: Path) -> MiniCPMForCausalLM:
    """The saved fp16 checkpoint, strictly loaded into a fresh fp32 model (what the runtimes see)."""
    model = MiniCPMForCausalLM(ModelConfig.from_file(folder))
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def plot_losses(logs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, log in logs.items():
        line, = ax.plot([r["step"] for r in log["train"]], [r["loss"] for r in log["train"]],
                        label=f"{name} train ({log['params'] / 1e6:.1f}M)")
        ax.plot([r["step"] for r in log["heldout_subset"]] + [log["steps"]],
                [r["loss"] for r in log["heldout_subset"]] + [log["heldout_loss"]],
                "o--", color=line.get_color(), label=f"{name} held-out")
    ax.axhline(logs["target"]["unigram_heldout_loss"], color="gray", ls=":", label="unigram held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("wind tunnel: CPython stdlib, 256-token sequences, WSD schedule")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache folder (default: {DEFAULT_OUT})")
    ap.add_argument("--time-steps", type=int, default=None, metavar="N",
                    help="only run N training steps of each model and report s/step (nothing is saved)")
    ap.add_argument("--no-compile", action="store_true", help="eager training (no C++ compiler available)")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    root = args.out.expanduser()
    tokenizer_dir = root / "tokenizer"
    tok = Tokenizer.from_pretrained(tokenizer_dir)

    t0 = time.time()
    train_stream = token_stream(tok, (root / "corpus/train.txt").read_text(encoding="utf-8"))
    heldout_stream = token_stream(tok, (root / "corpus/heldout.txt").read_text(encoding="utf-8"))
    train, heldout = windows(train_stream), windows(heldout_stream)
    heldout_subset = heldout[:: max(1, len(heldout) // HELDOUT_SUBSET_WINDOWS)][:HELDOUT_SUBSET_WINDOWS]
    print(f"train {len(train_stream)} tokens ({len(train)} windows), held-out {len(heldout_stream)} tokens "
          f"({len(heldout)} windows, {heldout[:, 1:].numel()} scored) in {time.time() - t0:.1f}s")

    if args.time_steps:
        for name, spec in MODELS.items():
            _, log = train_one(name, spec, tok, train, heldout_subset, not args.no_compile,
                               time_steps=args.time_steps)
            print(f"[{name}] first step {log['first_step_s']:.1f} s, then {log['s_per_step_after_first']:.2f} s/step")
        return

    unigram = unigram_loss(train_stream, heldout, tok.vocab_size)
    print(f"unigram held-out loss {unigram:.4f} (ppl {math.exp(unigram):.1f})")
    logs = {}
    wall_start = time.time()
    for name, spec in MODELS.items():
        model, log = train_one(name, spec, tok, train, heldout_subset, not args.no_compile)
        folder = HERE / name
        log["checkpoint_bytes"] = save_checkpoint(model, log["config"], tokenizer_dir, folder)
        # Reported numbers come from the shipped fp16 weights, loaded the way the runtimes load them.
        shipped = load_shipped(folder)
        log["heldout_loss"] = heldout_loss(shipped, heldout)
        log["heldout_ppl"] = math.exp(log["heldout_loss"])
        log["unigram_heldout_loss"], log["unigram_heldout_ppl"] = unigram, math.exp(unigram)
        print(f"[{name}] held-out loss {log['heldout_loss']:.4f} ppl {log['heldout_ppl']:.2f} "
              f"(unigram {math.exp(unigram):.1f}); checkpoint {log['checkpoint_bytes'] / 1e6:.2f} MB", flush=True)
        if name == "target":
            log["samples"] = {p: greedy(shipped, tok, p) for p in SAMPLE_PROMPTS}
            for p, s in log["samples"].items():
                print(f"[{name}] greedy {p!r}: {s!r}")
        logs[name] = log
    summary = {
        "seed": SEED, "compiled": not args.no_compile, "threads": THREADS, "torch": torch.__version__,
        "train_tokens": len(train_stream), "heldout_tokens_scored": int(heldout[:, 1:].numel()),
        "total_wall_s": time.time() - wall_start,
        "target_over_unigram_ppl": logs["target"]["heldout_ppl"] / math.exp(unigram),
    }
    (HERE / "train_log.json").write_text(json.dumps({"summary": summary, **logs}, indent=1) + "\n")
    plot_losses(logs, HERE / "loss.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
