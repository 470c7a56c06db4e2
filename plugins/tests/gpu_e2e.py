"""The GPU check's end-to-end rows (`e2e`): whole models on the torch backend's CUDA path
(runtimes/torch.py: device arena, decode graphs, edgecpm's kernels) against the CPU reference.

- tokens: a MiniCPM4-0.5B-shaped and an 8B-shaped model (few layers, random weights, InfLLM v2 on;
  the 0.5B shape also dense, which takes the CUDA-graph decode step) give the CPU reference's
  greedy tokens for 64 steps after a prompt past dense_len (fp32 on both sides, so a flipped
  argmax is a bug, not rounding); fp16 on the GPU is reported beside it (steps agreeing).
- decode: tok/s of the 0.5B shape (fp16, graphs) against the roofline of the GPU's measured copy
  bandwidth (weights + the KV rows a step reads, per token).
- sparse vs dense decode at 64K/128K context (8B shape, shipped sparse settings, the arena filled
  with random rows: timing only).
- ternary 0.5B decode vs fp16.

A dry run (CPU) runs the reference side at reduced shapes and the CUDA path's host logic on CPU
tensors (device arena, decode graphs replayed eagerly): scope "host", no kernel, no GPU.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
STEPS = 64
# Reduced so that a CPU reference can prefill past dense_len in seconds; the timings use the
# shipped settings (SparseConfig's defaults).
E2E_SPARSE = {"dense_len": 1024, "window_size": 256, "topk": 8}
DRY_SPARSE = {"dense_len": 128, "window_size": 128, "topk": 2}


@dataclass
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    layers: int
    tie: bool

    def describe(self) -> str:
        return (f"H={self.hidden} Hq={self.heads} Hkv={self.kv_heads} D={self.hidden // self.heads} "
                f"I={self.intermediate} V={self.vocab} L={self.layers}")


# Untied LM heads: with random weights a tied head mostly predicts the input token back, and greedy
# decoding repeats one token (a check that cannot tell a stale step from a right one).
SHAPES = {"0.5B": Shape("0.5B", 1024, 16, 2, 4096, 73448, 4, False),
          "8B": Shape("8B", 4096, 32, 2, 16384, 73448, 2, False)}
DRY_SHAPES = {"0.5B": Shape("0.5B", 256, 16, 2, 512, 1024, 2, False),
              "8B": Shape("8B", 512, 32, 2, 512, 1024, 2, False)}
LOGIT_TOL = {"fp32": 1e-3, "fp16": 5e-2}  # max |logit - ref| / max |ref| over the steps, before any divergence


def plan(dry_run: bool) -> list[tuple[str, str]]:
    """(row, shape) of every e2e row the run executes."""
    shapes = DRY_SHAPES if dry_run else SHAPES
    sp = DRY_SPARSE if dry_run else E2E_SPARSE
    prompt = prompt_len(dry_run)
    steps = 16 if dry_run else STEPS
    rows = [(f"e2e tokens {s} sparse", f"{shapes[s].describe()} prompt={prompt} steps={steps} sparse={sp}")
            for s in ("0.5B", "8B")]
    rows.append(("e2e tokens 0.5B dense (decode graphs)", f"{shapes['0.5B'].describe()} prompt={prompt} "
                 f"steps={steps}"))
    if not dry_run:
        rows += [("e2e decode tok/s vs copy roofline", f"0.5B fp16 {SHAPES['0.5B'].describe()} P={TIMED_P}"),
                 ("e2e ternary decode vs fp16", f"0.5B {SHAPES['0.5B'].describe()} P={TIMED_P}"),
                 *(("e2e sparse vs dense decode", f"8B fp16 {SHAPES['8B'].describe()} P={P}")
                   for P in SPARSE_VS_DENSE_P)]
    return rows


def prompt_len(dry_run: bool) -> int:
    return (DRY_SPARSE if dry_run else E2E_SPARSE)["dense_len"] + (72 if dry_run else 476)


# ---- the SDK from this source tree -------------------------------------------------------------------
def import_sdk():
    """edgecpm's config, generate loop, model and torch backend from this tree, installed or not
    (without tokenizers: bare packages mapped onto edgecpm/, export/, runtimes/)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import edgecpm  # noqa: F401
    except ImportError:
        for name, folder in (("edgecpm", "edgecpm"), ("edgecpm.export", "export"), ("edgecpm.runtimes", "runtimes")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(ROOT / folder)]
            sys.modules[name] = pkg
    from edgecpm import generate
    from edgecpm.config import ModelConfig
    from edgecpm.export import modeling_minicpm
    from edgecpm.kv_cache import KVCache
    from edgecpm.runtimes import torch as runtime

    return types.SimpleNamespace(generate=generate, ModelConfig=ModelConfig, modeling=modeling_minicpm,
                                 KVCache=KVCache, runtime=runtime)


def base_config() -> dict:
    spec = importlib.util.spec_from_file_location("edgecpm_benchmarks_common", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return copy.deepcopy(common.MINICPM4_05B_CONFIG)


def config_dict(shape: Shape, sparse: dict | None, max_positions: int = 32768) -> dict:
    cfg = base_config()
    cfg.pop("auto_map", None)
    cfg.update(hidden_size=shape.hidden, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
               intermediate_size=shape.intermediate, vocab_size=shape.vocab, num_hidden_layers=shape.layers,
               tie_word_embeddings=shape.tie, max_position_embeddings=max_positions, eos_token_id=[2])
    half = shape.hidden // shape.heads // 2
    for key in ("long_factor", "short_factor"):  # LongRoPE factors resampled to this head_dim
        src = np.asarray(cfg["rope_scaling"][key], np.float64)
        cfg["rope_scaling"][key] = np.interp(np.linspace(0, len(src) - 1, half), np.arange(len(src)), src).tolist()
    if sparse is not None:
        cfg["sparse_config"] = sparse
    return cfg


def random_model(sdk, torch, cfg_dict: dict, seed: int = 0):
    """Weights ~ N(0, 0.05), norms 1 (fp32, CPU)."""
    cfg = sdk.ModelConfig.from_dict(cfg_dict)
    model = sdk.modeling.MiniCPMForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def backend(sdk, torch, model, device: str, dtype, resident: bool | None = None, capture=None):
    b = sdk.runtime.TorchBackend.__new__(sdk.runtime.TorchBackend)
    dev = torch.device(device)
    b._attach(model.to(dtype), dev, dtype, resident=resident, decode_graphs=dev.type == "cuda" or capture is not None,
              capture=capture)
    return b


def greedy(sdk, b, prompt, steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens after `prompt` and the logits each was taken from [steps, V] (the generate
    loop's own functions)."""
    cache = sdk.KVCache(b.config, len(prompt) + steps + 1, b.kv_dtype)
    logits = [sdk.generate.prefill(b, cache, prompt)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        if len(tokens) < steps:
            logits.append(sdk.generate.decode_one_token(b, cache, tokens[-1]))
    return tokens, np.stack(logits)


class EagerCapture:
    """A dry run's stand-in for CUDA graph capture: a replay reruns the step on the static buffers."""

    def capture(self, fn):
        outputs = fn()

        def replay():
            for static, new in zip(outputs, fn(), strict=True):
                static.copy_(new)

        return replay, outputs


def run_tokens(torch, sdk, rep, dry_run: bool, seed: int = 0):
    shapes = DRY_SHAPES if dry_run else SHAPES
    steps = 16 if dry_run else STEPS
    prompt = np.random.default_rng(seed).integers(3, shapes["0.5B"].vocab, size=prompt_len(dry_run)).tolist()
    sparse = DRY_SPARSE if dry_run else E2E_SPARSE
    for row, shape, sp in (("e2e tokens 0.5B sparse", "0.5B", sparse), ("e2e tokens 8B sparse", "8B", sparse),
                           ("e2e tokens 0.5B dense (decode graphs)", "0.5B", None)):
        t0 = time.time()
        model = random_model(sdk, torch, config_dict(shapes[shape], sp), seed)
        ref, ref_logits = greedy(sdk, backend(sdk, torch, copy.deepcopy(model), "cpu", torch.float32), prompt, steps)
        case = f"{shapes[shape].describe()} prompt={len(prompt)} steps={steps}"
        if dry_run:  # the CUDA path's host logic on CPU tensors: device arena + eager decode graphs
            runs = (("fp32", greedy(sdk, backend(sdk, torch, model, "cpu", torch.float32, resident=True,
                                                 capture=EagerCapture()), prompt, steps)),)
            scope = "host"
        else:
            runs = (("fp32", greedy(sdk, backend(sdk, torch, copy.deepcopy(model), "cuda", torch.float32), prompt,
                                    steps)),
                    ("fp16", greedy(sdk, backend(sdk, torch, model, "cuda", torch.float16), prompt, steps)))
            scope = "kernel"
        for dtype, (ours, logits) in runs:
            agree = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), steps)
            n = max(agree, 1)  # the logits of the steps fed the same tokens
            err = float(np.abs(logits[:n] - ref_logits[:n]).max() / np.abs(ref_logits[:n]).max())
            must = dtype == "fp32"  # fp16 rounding may flip a near-tie argmax of random weights
            note = f"{len(set(ref))} distinct tokens, logits rel err {err:.1e}, {time.time() - t0:.0f} s"
            rep.check(row, case, dtype, agree, steps, what="steps equal to the CPU reference",
                      ok=agree == steps if must else True, note=note + ("" if must else "; fp16: not required"),
                      scope=scope)
            rep.check(f"{row}: logits", case, dtype, err, LOGIT_TOL[dtype], scope=scope)


# ---- timings (GPU; the tests run the same code on CPU stand-ins at tiny shapes) --------------------
TIMED_P = 1024  # context of the 0.5B decode timings
SPARSE_VS_DENSE_P = (65536, 131072)


def fill_arena(torch, b, cache, P: int, seed: int = 0):
    """A context of P random rows in the backend's device arena (timing only)."""
    arena = b._arena_for(cache)
    g = torch.Generator(device=arena.kv.device).manual_seed(seed)
    arena.kv[:, :, :P].normal_(generator=g)
    if arena.sparse:  # chunk j = mean of rows [j * stride, j * stride + kernel)
        sp = arena.sparse
        windows = arena.kv[:, 0, :P].float().unfold(1, sp.kernel_size, sp.kernel_stride)  # [L, nc, Hkv, D, kernel]
        arena.ck[:, : sp.n_chunks(P)] = windows.mean(-1)
    cache.commit(np.zeros(P, np.int64))


def decode_tok_s(torch, sdk, b, P: int, steps: int = 32) -> float:
    cache = sdk.KVCache(b.config, P + steps + 4, b.kv_dtype)
    fill_arena(torch, b, cache, P)
    for _ in range(3):  # warm-up (captures the span's graph)
        sdk.generate.decode_one_token(b, cache, 5)
    if b.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):  # each step brings its logits to the host: no sync needed after
        sdk.generate.decode_one_token(b, cache, 5)
    return steps / (time.perf_counter() - t0)


def run_timings(torch, sdk, rep, copy_gbps: float, shapes=SHAPES, P: int = TIMED_P, contexts=SPARSE_VS_DENSE_P,
                device: str = "cuda", capture=None):
    """decode vs the roofline, ternary vs fp16 (0.5B shape), sparse vs dense (8B shape), fp16.
    device/capture: the tests' CPU stand-ins (resident arena, eager graphs)."""
    def on_device(model):
        return backend(sdk, torch, model, device, torch.float16, resident=True, capture=capture)

    shape = shapes["0.5B"]
    model = random_model(sdk, torch, config_dict(shape, None))
    b = on_device(model)
    tps = decode_tok_s(torch, sdk, b, P)
    step_bytes = b.weight_bytes + P * b.config.kv_bytes_per_token(2)
    roof = copy_gbps * 1e9 / step_bytes  # the copy's traffic (read + write) per second, all spent reading
    rep.timing("e2e decode tok/s vs copy roofline", f"0.5B fp16 {shape.describe()} P={P}", "fp16", 1e6 / tps,
               extra={"tok_s": tps, "roofline_tok_s": roof, "fraction": tps / roof},
               result=f"{tps:.0f} tok/s = {tps / roof:.2f} of {roof:.0f} tok/s")
    tern = on_device(ternary_model(torch, sdk, model))
    t_tps = decode_tok_s(torch, sdk, tern, P)
    rep.timing("e2e ternary decode vs fp16", f"0.5B {shape.describe()} P={P}", "fp16", 1e6 / t_tps, "fp16 decode",
               1e6 / tps, {"tok_s": t_tps, "fp16_tok_s": tps})
    del b, tern, model
    big = shapes["8B"]
    for S in contexts:
        # The same weights (same seed) with InfLLM v2 at the shipped settings ({}) and without.
        sparse = on_device(random_model(sdk, torch, config_dict(big, {}, max_positions=S + 256)))
        s_tps = decode_tok_s(torch, sdk, sparse, S, steps=8)
        del sparse
        dense = on_device(random_model(sdk, torch, config_dict(big, None, max_positions=S + 256)))
        d_tps = decode_tok_s(torch, sdk, dense, S, steps=8)
        del dense
        rep.timing("e2e sparse vs dense decode", f"8B fp16 {big.describe()} P={S}", "fp16", 1e6 / s_tps,
                   "dense decode", 1e6 / d_tps, {"sparse_tok_s": s_tps, "dense_tok_s": d_tps})


def ternary_model(torch, sdk, model):
    """A CPU copy of `model` with every linear of its layers ternary (random codes, group 128)."""
    from edgecpm.export.ternary import TernaryInfo
    from edgecpm.ternary_format import pack

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    infos = {f"{n}.weight": TernaryInfo("group", 128, tuple(model.get_submodule(n).weight.shape)) for n in names}
    tern = copy.deepcopy(model).cpu()
    sdk.modeling.use_ternary(tern, infos)
    rng = np.random.default_rng(1)
    for n in names:
        lin = tern.get_submodule(n)
        codes = rng.integers(0, 3, size=(lin.out_features, lin.in_features), dtype=np.uint8)
        lin.packed = torch.from_numpy(pack(codes).view(np.int32))
        lin.scales = torch.from_numpy(rng.uniform(0.01, 0.05, lin.scales.shape).astype(np.float32))
    return tern
