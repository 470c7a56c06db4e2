"""Pieces every benchmark shares: random checkpoints of real shapes, memory bandwidth, RSS,
the decode roofline, machine facts, and the JSON + markdown outputs (DESIGN.md §12).

Run benchmarks as scripts (`python benchmarks/<name>.py`); this module is imported as `common`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SHARED = ROOT.parent / "shared" / "minicpm4"

# MiniCPM4-0.5B's shipped config.json (openbmb/MiniCPM4-0.5B), used when ../shared is absent.
_LONGROPE_05B = [
    1.0004360675811768, 1.0668443441390991, 1.1631425619125366, 1.3025742769241333, 1.5040205717086792,
    1.7941505908966064, 2.2101221084594727, 2.802666664123535, 3.6389970779418945, 4.804192543029785,
    6.39855432510376, 8.527148246765137, 11.277542114257812, 14.684998512268066, 18.69317054748535,
    23.13019371032715, 27.72362518310547, 32.1606559753418, 36.168827056884766, 39.57627868652344,
    42.32667541503906, 44.45526885986328, 46.04962921142578, 47.21482849121094, 48.05115509033203,
    48.64370346069336, 49.05967712402344, 49.34980392456055, 49.551246643066406, 49.69068145751953,
    49.78697967529297, 49.85338592529297,
]
MINICPM4_05B_CONFIG = {
    "architectures": ["MiniCPMForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": [2, 73440],
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.1,
    "intermediate_size": 4096,
    "max_position_embeddings": 32768,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "rope_type": "longrope",
        "long_factor": _LONGROPE_05B,
        "short_factor": _LONGROPE_05B,
        "original_max_position_embeddings": 32768,
    },
    "torch_dtype": "bfloat16",
    "vocab_size": 73448,
    "scale_emb": 12,
    "dim_model_base": 256,
    "scale_depth": 1.4,
}


def minicpm4_config(name: str = "MiniCPM4-0.5B") -> tuple[dict, str]:
    """The real config dict and where it came from (../shared copy, else the embedded 0.5B one)."""
    path = SHARED / name / "config.json"
    if path.exists():
        return json.loads(path.read_text()), str(path)
    if name != "MiniCPM4-0.5B":
        raise FileNotFoundError(f"{path} not found (only MiniCPM4-0.5B's config is embedded)")
    return json.loads(json.dumps(MINICPM4_05B_CONFIG)), "embedded copy of MiniCPM4-0.5B/config.json"


# ---- random checkpoints ----------------------------------------------------------------------
def write_random_checkpoint(folder: str | Path, config: dict, seed: int = 0, std: float = 0.02,
                            dtype="fp32", transform=None) -> Path:
    """Write config.json + model.safetensors with every tensor the model expects (names and shapes
    from `edgecpm.export.checkpoint.expected_shapes`): matrices ~ N(0, std), norm weights = 1,
    drawn in float32, then `transform(name, array)` if given, then stored as `dtype` (fp32, fp16,
    bf16 or a numpy dtype).

    The safetensors file is streamed one tensor at a time, so peak memory is one tensor, not the
    model. Needs torch (for expected_shapes); returns the folder.
    """
    from edgecpm import dtypes
    from edgecpm.config import ModelConfig
    from edgecpm.export.checkpoint import expected_shapes
    from edgecpm.safetensors_files import ST_FLOAT_DTYPES

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = expected_shapes(ModelConfig.from_dict(config, source=str(folder / "config.json")))
    st_dtype = next(st for st, n in ST_FLOAT_DTYPES.items() if n == dtypes.canonical(dtype))
    dtype = dtypes.numpy_dtype(dtype)
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    rng = np.random.default_rng(seed)
    tmp = folder / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                t = np.ones(shape, np.float32)
            else:
                t = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
            if transform is not None:
                t = transform(name, t)
            f.write(t.astype(dtype, copy=False).tobytes())
        # Flush to disk now, so write-back of a GB-sized file does not run during the timed runs.
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / "model.safetensors")
    return folder


# ---- machine measurements ---------------------------------------------------------------------
def timings(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def memory_bandwidth(size_bytes: int = 512 * 2**20, repeats: int = 3) -> dict:
    """Best-of-N numpy copy of a `size_bytes` array: (bytes read + bytes written) / seconds.

    numpy copies on one thread, so this is the single-stream bandwidth; both buffers are touched
    first so page faults are not timed.
    """
    n = size_bytes // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = timings(functools.partial(np.copyto, dst, src), repeats)
    best = min(times)
    del src, dst
    return {"bytes_per_s": 2 * n * 8 / best, "array_bytes": n * 8, "best_s": best, "times_s": times,
            "method": f"numpy copyto of a {n * 8 // 2**20} MiB float64 array, best of {repeats}, (read+write)/s"}


def gemv_bandwidth(threads: int, size_bytes: int = 512 * 2**20, k: int = 1024, n: int = 4096, repeats: int = 5) -> dict:
    """Weight-read bandwidth the way onnxruntime reads a decode step's weights: fp32 MatMuls
    [1, k] x [k, n] (MiniCPM4-0.5B's linear shape) over `size_bytes` of initializers in one graph,
    on `threads` intra-op threads spin-waiting (as edgecpm's backend runs a session alone). Best of N:
    weight bytes / seconds. This is the roofline's bandwidth; `memory_bandwidth` (a one-thread
    numpy copy, read + write) is reported beside it."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    count = max(1, size_bytes // (4 * k * n))
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"w{i}") for i in range(count)]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(count)], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(count)],
                              inits)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    del inits, graph
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    del model
    x = {"x": np.ones((1, k), np.float32)}
    sess.run(None, x)  # warm-up: pages in the weights
    times = timings(lambda: sess.run(None, x), repeats)
    best = min(times)
    total = count * k * n * 4
    return {"bytes_per_s": total / best, "weight_bytes": total, "threads": threads, "best_s": best, "times_s": times,
            "method": f"onnxruntime: {count} fp32 MatMuls [1,{k}]x[{k},{n}] in one graph on {threads} threads, "
                      f"best of {repeats}, weight bytes read / s"}


def current_rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def decode_weight_bytes(cfg, bytes_per_weight: int) -> dict:
    """Bytes of weights one decode token reads: every linear layer, the LM head (the embedding
    matrix when tied), all RMSNorm weights, and one embedding row for the lookup."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    linear = L * (h * q + 2 * h * kv + q * h + 3 * h * i)
    lm_head = cfg.vocab_size * h
    norms = (2 * L + 1) * h
    embed_row = h
    elems = linear + lm_head + norms + embed_row
    return {"linear_elements": linear, "lm_head_elements": lm_head, "norm_elements": norms,
            "embedding_row_elements": embed_row, "bytes_per_weight": bytes_per_weight,
            "bytes": elems * bytes_per_weight}


def median(xs):
    return statistics.median(xs)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus_visible": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__}
    for package in ("onnxruntime", "torch", "onnx"):  # what ran the numbers
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    try:
        affinity = len(os.sched_getaffinity(0))
        info["cpus_usable"] = affinity
    except AttributeError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


# ---- command line and outputs -----------------------------------------------------------------
def arg_parser(doc: str, name: str, threads: int = 2, prompt_len: int | None = None, new_tokens: int | None = None,
               repeats: int | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser with the options they share: --threads, --output, and --prompt-len /
    --new-tokens / --repeats where given a default. The caller adds its own and parses."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=threads, help=f"CPU threads of the backend (default: {threads})")
    if prompt_len is not None:
        p.add_argument("--prompt-len", type=int, default=prompt_len,
                       help=f"prompt tokens for prefill (default: {prompt_len})")
    if new_tokens is not None:
        p.add_argument("--new-tokens", type=int, default=new_tokens,
                       help=f"tokens generated per run (default: {new_tokens})")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats,
                       help=f"timed runs; the median is reported (default: {repeats})")
    p.add_argument("--output", type=Path, default=None, help=f"JSON path (default: benchmarks/results/{name}.json)")
    return p


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict, path: str | Path | None = None) -> Path:
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def result_header(name: str, argv: list[str] | None, **machine) -> dict:
    """The fields every benchmark's JSON starts with: its name, the command that reproduces it
    (argv: main's argument, None for sys.argv), the date and the machine (machine_info() + `machine`)."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    return {"benchmark": name, "command": f"python benchmarks/{name}.py {args}".rstrip(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": {**machine_info(), **machine}}


def finish(result: dict, blocks: list[str], output: str | Path | None = None, note: str = "") -> int:
    """A benchmark's last step: write `result` to benchmarks/results/<benchmark>.json (or `output`),
    print `blocks` (markdown tables, captions) to stdout a blank line apart, then `note` and where
    the JSON went to stderr. Returns main's exit status, 0."""
    path = write_results(result["benchmark"], result, output)
    print("\n\n".join(blocks))
    print("\n" + (note + "\n" if note else "") + f"wrote {path}", file=sys.stderr)
    return 0


# ---- child processes ----------------------------------------------------------------------------
# Runs argv[2:] as a child of this small process and writes its exit status and rusage to argv[1]:
# the child's ru_maxrss is its own peak RSS (a child forked from a big process would start from
# the parent's high-water mark, which is why the benchmark process does not fork it directly).
_RUSAGE_WRAPPER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kib": ru.ru_maxrss,
               "wall_s": time.perf_counter() - t0, "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, f)
"""


def run_measured(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `cmd` (no shell) and return its returncode, stdout, stderr, wall seconds, CPU seconds and
    peak RSS in bytes (the child's ru_maxrss, from a small wrapper process that forks it: Linux).
    Past `timeout` seconds the child is killed and returncode is None, with `error` saying so."""
    import signal
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgecpm-run-") as tmp:
        usage_path = Path(tmp) / "rusage.json"
        p = subprocess.Popen([sys.executable, "-c", _RUSAGE_WRAPPER, str(usage_path), *map(str, cmd)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)  # its own process group: a timeout kills the child too
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            stdout, stderr = p.communicate()
            return {"returncode": None, "error": f"timed out after {timeout} s", "stdout": stdout,
                    "stderr": stderr, "wall_s": None, "cpu_s": None, "peak_rss_bytes": None}
        usage = json.loads(usage_path.read_text()) if usage_path.exists() else {}
    return {"returncode": usage.get("returncode", p.returncode), "stdout": stdout, "stderr": stderr,
            "wall_s": usage.get("wall_s"), "cpu_s": (usage.get("user_s", 0) + usage.get("sys_s", 0)) or None,
            "peak_rss_bytes": usage["maxrss_kib"] * 1024 if "maxrss_kib" in usage else None}


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages now (other jobs on a shared machine show here)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
