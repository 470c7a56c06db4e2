"""Opening what a Session runs on: the backend for a folder, its tokenizer, a draft model's or
EAGLE head's backend. Backend modules (edgecpm.runtimes.*) are imported here, lazily, so that
`import edgecpm` stays light and an ONNX bundle never pulls in torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgecpm.bundle import check_manifest, is_bundle, load_bundle, manifest_path, read_manifest
from edgecpm.config import ModelConfig
from edgecpm.drafters import is_eagle
from edgecpm.errors import BackendUnavailable, ConfigError
from edgecpm.tokenizer import Tokenizer

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
AUTO_RULE = ("a checkpoint runs on torch; a bundle runs on TensorRT when it holds an engine built for this GPU "
             "and TensorRT version, otherwise on onnxruntime")


def open_backend(path: Path, backend: str = "auto", dtype: str | None = None, threads: int | None = None,
                 verify: bool = False, device: str | None = None):
    """The backend for a checkpoint or bundle folder (`auto`: see AUTO_RULE). device: the torch
    backend's ("cpu" by default, "cuda"); a bundle's backends refuse it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    path = Path(path)
    bundle = is_bundle(path)
    if not bundle and not (path / "config.json").exists():
        raise ConfigError(f"{path}: neither an exported bundle (manifest.json) nor a checkpoint (config.json)")
    if backend == "auto" and not bundle:
        backend = "torch"
    if backend == "torch":
        if bundle:
            raise ConfigError(f"{path}: the torch backend runs Hugging Face checkpoints; this is a bundle "
                              f"(use backend='onnxruntime' or 'auto')")
        return _torch_runtime().TorchBackend(str(path), dtype=dtype, threads=threads, device=device)
    if device is not None:
        raise ConfigError(f"{path}: device={device!r} applies to the torch backend (a checkpoint folder); a bundle "
                          f"runs on onnxruntime's providers or a TensorRT engine built for its GPU")
    if not bundle:
        raise ConfigError(f"{path}: backend {backend!r} runs exported bundles; export one first with "
                          f"`edgecpm export {path} -o BUNDLE`")
    b = load_bundle(path, verify=verify)
    if backend == "auto":  # an engine built for this GPU and TensorRT wins; onnxruntime otherwise
        backend = "onnxruntime"
        if b.manifest.get("engines"):
            from edgecpm.runtimes.tensorrt import usable_engine

            backend = "tensorrt" if usable_engine(b)[0] else "onnxruntime"
    if backend == "tensorrt":
        from edgecpm.runtimes.tensorrt import TensorRTBackend

        return TensorRTBackend(b, threads=threads, verify=verify)
    if dtype is not None and dtype != b.dtype:
        raise ConfigError(f"{path}: bundle was exported as {b.dtype}; dtype={dtype!r} needs a re-export")
    from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(b, threads=threads)


def _torch_runtime():
    try:
        import edgecpm.runtimes.torch as runtime
    except ImportError as e:
        raise BackendUnavailable(f"backend 'torch' needs torch ({e}); pip install 'edgecpm[export]'") from None
    return runtime


def open_tokenizer(path: Path, backend) -> Tokenizer | None:
    """The folder's tokenizer; None for a folder without tokenizer files (e.g. a bare test
    checkpoint, which then runs on token ids only). A checkpoint with only a SentencePiece
    `tokenizer.model` is converted by the torch path (bundles always carry tokenizer.json)."""
    path = Path(path)
    if (path / "tokenizer.json").exists():
        return Tokenizer.from_pretrained(path)
    if (path / "tokenizer.model").exists() and backend.name == "torch":
        return _torch_runtime().load_tokenizer(path)
    if (path / "tokenizer.model").exists():
        return Tokenizer.from_pretrained(path)  # says what to do
    return None


def open_draft_backend(draft, target, threads: int | None):
    """The backend of a draft model or EAGLE head folder (bundle or checkpoint); `target` is the
    target's backend, whose vocabulary the draft must share. It takes the target's threads: the two
    take turns, and onnxruntime's workers spin only within a run (OnnxRuntimeBackend), so two pools
    do not fight for the cores. Wind-tunnel pair, 2 threads, ad hoc A/B of 4 process pairs: the
    EAGLE head + FR-Spec 1.17-1.21x plain decoding against 1.12-1.16x with the former rule (a small
    draft on one thread, its pool asleep); a MiniCPM4-0.5B-shaped target and draft 14.1-14.3 against
    13.3-13.4 tok/s with both pools asleep, as large drafts used to run."""
    path = Path(draft)
    check_draft(path, target.config.vocab_size)
    return open_eagle_backend(path, target, threads) if is_eagle(path) else open_backend(path, threads=threads)


def folder_config(path: Path) -> ModelConfig | None:
    """The model config of a bundle, checkpoint or EAGLE head folder, from its manifest or
    config.json alone (no weights loaded); None for a folder that is neither."""
    path = Path(path)
    if is_bundle(path):
        return check_manifest(read_manifest(path), manifest_path(path))
    if not (path / "config.json").is_file():
        return None
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return ModelConfig.for_eagle(raw, str(path)) if is_eagle(path) else ModelConfig.from_dict(raw, str(path))


def check_draft(path: Path, vocab_size: int) -> None:
    """Refuse a draft folder that cannot draft for a target of `vocab_size`, reading only its
    config (bench validates every drafter this way before measuring any)."""
    cfg = folder_config(path)
    if cfg is None:
        raise ConfigError(f"draft={str(path)!r}: expected 'ngram' or a draft bundle/checkpoint folder")
    if cfg.vocab_size != vocab_size:
        raise ConfigError(f"{path}: draft vocabulary {cfg.vocab_size} differs from the target's {vocab_size}; a "
                          f"draft must share the target's tokenizer")


def open_eagle_backend(path: Path, target, threads: int | None):
    """An EAGLE head: a bundle runs on onnxruntime; a checkpoint on torch, sharing a torch
    target's embedding and LM head when it has none of its own."""
    if not target.has_hidden:
        where = target.bundle.path if target.bundle else "the target"
        raise ConfigError(f"{where}: this target bundle has no `hidden` output (exported by an older edgecpm), which "
                          f"an EAGLE head drafts from; re-export it: `edgecpm export CHECKPOINT -o BUNDLE`")
    if is_bundle(path):
        from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(load_bundle(path), threads=threads)
    return _torch_runtime().EagleTorchBackend(str(path), target, threads=threads)
