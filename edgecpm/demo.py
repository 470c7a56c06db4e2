"""`edgecpm demo`: the whole flow on the built-in wind-tunnel models, on any machine.

The repository ships a small trained MiniCPM4-architecture target and draft
(`samples/wind_tunnel/{target,draft}`, see their model card). On first use they are exported to
bundles in a cache folder (~/.cache/edgecpm/demo, or $EDGECPM_CACHE/demo); then a prompt is
streamed with speculative decoding and a chat turn runs, each with its stats.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from edgecpm.bundle import load_bundle
from edgecpm.errors import BundleError, ConfigError, EdgeCPMError

BUILTIN = Path(__file__).resolve().parents[1] / "samples" / "wind_tunnel"
PROMPT = "import os\n\n\ndef list_files(path):\n"


def cache_root() -> Path:
    return Path(os.environ.get("EDGECPM_CACHE", Path.home() / ".cache" / "edgecpm")) / "demo"


def bundle_for(checkpoint: Path, say) -> Path:
    """The checkpoint's bundle in the cache, exported on first use (keyed by the weights' hash)."""
    weights = checkpoint / "model.safetensors"
    if not weights.exists():
        raise ConfigError(f"{checkpoint}: the built-in model is missing; run `edgecpm demo` from a clone of the "
                          f"repository (the models live in samples/wind_tunnel/)")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    bundle = cache_root() / f"{checkpoint.name}-{digest}"
    if not (bundle / "manifest.json").exists():
        try:
            from edgecpm.export.exporter import export_bundle
        except ImportError as e:
            raise ConfigError(f"exporting the demo model needs the export extra ({e}): "
                              f"pip install -e '.[export,ort]'") from None
        say(f"exporting {checkpoint.name} to {bundle} (first run only)")
        bundle.parent.mkdir(parents=True, exist_ok=True)
        export_bundle(checkpoint, bundle, force=True, progress=sys.stderr.isatty())
    # The demo's bundles are small: re-hash them on every run, so a damaged cache is caught even
    # where a file kept its size and mtime.
    try:
        load_bundle(bundle, verify=True)
    except EdgeCPMError as e:
        raise BundleError(f"the cached demo bundle {bundle} is damaged ({e}). Delete that folder "
                          f"(rm -r '{bundle}') and run `edgecpm demo` again: it is re-exported") from None
    return bundle


def run_demo(models: Path = BUILTIN, max_new_tokens: int = 96, out=None) -> dict:
    """out: where the text goes (default: sys.stdout as it is at the call, not at import)."""
    from edgecpm.drafters import SpecConfig
    from edgecpm.session import Session

    out = out if out is not None else sys.stdout

    def say(msg):
        print(f"[demo] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    target = bundle_for(models / "target", say)
    draft_dir = models / "draft"
    draft = SpecConfig(draft=str(bundle_for(draft_dir, say)), depth=4, tree_size=4) if draft_dir.exists() else None
    s = Session(target, kv_budget="64MiB", draft=draft)
    say(f"backend {s.backend.name}, {'draft model ' + str(draft.draft) if draft else 'no draft'}; "
        f"KV budget {s.kv_budget} bytes = {s.cache.capacity} tokens")

    say(f"generate: {PROMPT!r}")
    out.write(PROMPT)
    for piece in s.stream(PROMPT, max_new_tokens=max_new_tokens):
        out.write(piece)
        out.flush()
    gen = s.last
    out.write("\n")
    say(_stats_line(gen.stats))

    chat = s.chat(system="You are a helpful Python assistant.")
    question = "How do I open a file?"
    say(f"chat: {question!r}")
    for piece in chat.stream(question, max_new_tokens=48, temperature=0.7, seed=0):
        out.write(piece)
        out.flush()
    out.write("\n")
    say(_stats_line(s.last.stats))
    mem = s.memory()
    say(f"memory: weights {mem['weights_bytes'] / 2**20:.1f} MiB, KV allocated "
        f"{(mem['kv_allocated_bytes'] + mem['draft_kv_allocated_bytes']) / 2**20:.1f} MiB of a "
        f"{mem['kv_budget_bytes'] / 2**20:.0f} MiB budget; done in {time.perf_counter() - t0:.1f} s")
    return {"generate": gen, "chat": s.last, "memory": mem}


def _stats_line(st: dict) -> str:
    return (f"prefill {st['prefill_tokens']} tok at {st['prefill_tok_s']:.0f} tok/s, decode {st['decode_tokens']} tok "
            f"at {st['decode_tok_s']:.1f} tok/s, {st['accepted_per_step']:.2f} tokens per step, "
            f"KV {st['kv_tokens']} tokens ({st['kv_bytes_in_use'] / 1024:.0f} KiB)")
