"""`edgecpm export`: checkpoint -> bundle (DESIGN.md §5).

The bundle is written into a temporary sibling folder and renamed into place only when complete
and checked, so an interrupted export never leaves a folder that loads as a bundle. `--force`
replaces only an earlier edgecpm bundle, never the checkpoint or a folder holding it, and the old
bundle is removed only after the new one is in place. Partial folders left by a killed export
are cleaned by the next export into the same place.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from edgecpm import __version__
from edgecpm.bundle import FORMAT, FORMAT_VERSION, MANIFEST, file_record, read_manifest, write_manifest
from edgecpm.errors import BundleError
from edgecpm.export.checkpoint import Checkpoint
from edgecpm.export.custom_ops import DOMAIN
from edgecpm.export.onnx_graph import NUMPY_DTYPE, build_decoder, graph_io
from edgecpm.export.quantize import MODES, HeadQuant, QuantPlan, head_mode
from edgecpm.export.quantize import summary as quant_summary
from edgecpm.export.ternary import TernaryInfo, linear_names, plan, summary
from edgecpm.export.tokenizer_convert import load_tokenizer
from edgecpm.frspec import load_freq_table
from edgecpm.ternary_format import ACTIVATION_DIGITS

ALIGN = 4096  # page-aligned external tensors can be memory-mapped by the runtime


class ExternalDataWriter:
    """Streams initializers into one external-data file as the graph is built."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")  # noqa: SIM115 (closed by close() once the graph is built)
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        pad = -self.offset % ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        data = np.ascontiguousarray(array).tobytes()
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", len(data))):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        self.f.write(data)
        self.offset += len(data)
        return t

    def close(self):
        self.f.close()


def export_bundle(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False,
                  progress: bool = True, sparse: bool | dict = False, frspec: str | Path | None = None,
                  quantize: str | None = None, quantize_group_size: int | None = None,
                  eagle_of: str | Path | None = None,
                  ternary_activations: str = "exact", lm_head: str | None = None) -> Path:
    """sparse: True (or a dict of overrides) switches InfLLM v2 on with DESIGN.md §7's defaults.
    frspec: a freq.npy of r ids (from `edgecpm freq -r R`) for a draft model: those rows become the
    draft's LM head and the table is copied into the bundle.
    quantize: None packs the linear weights at 2 bits when the checkpoint is ternary (BitCPM4,
    detected exactly; a checkpoint with some non-ternary linears is refused), "ternary" also
    ternarizes the others (lossy: only for a QAT-trained model; one scale per `quantize_group_size`
    inputs, default per row), "none" keeps every linear dense, "int8" / "int4" store every decoder
    linear as int8 / int4 codes (export/quantize.py: round to nearest, asymmetric, one scale and zero
    per `quantize_group_size` inputs, -1 = per row; default 128 for int4, per row for int8; a 4-bit
    GPTQ / AWQ checkpoint keeps its own codes under int4) as QuantMatMul nodes. Packed linears are TernaryMatMul
    nodes (TensorRT's plugin; onnxruntime runs them on edgecpm's kernel or its own MatMulNBits).
    ternary_activations, recorded in the manifest, is how onnxruntime computes them
    (runtimes/ternary_lowering.py): "exact" (fp32 activations, the default: edgecpm's kernel where it
    can be built, else MatMulNBits on 3 int8 digits), "int16" (MatMulNBits on 2 digits, logits ~1e-5
    relative off: faster only where edgecpm's kernel cannot be built) or "int8" (1 digit, fastest,
    lossy: ~1e-3). The TensorRT plugin ignores it and computes in the model dtype.
    eagle_of: `checkpoint` is an EAGLE head (export/modeling_eagle.py) drafting for this target
    checkpoint, which supplies the embedding / LM head the head lacks; frspec restricts the head's
    LM head the same way. Its bundle runs as `Session(target, draft=BUNDLE)`.
    lm_head: how the embedding / LM head matrix is stored (export/quantize.py's HeadQuant): "dense"
    (the bundle's dtype), "int8" or "int4" (round to nearest, one scale and zero per 128 inputs);
    default int8 when the linears are int8, int4 or ternary, dense otherwise."""
    checkpoint, out = Path(checkpoint), Path(out)
    if ternary_activations not in ACTIVATION_DIGITS:
        raise ValueError(f"ternary_activations={ternary_activations!r}: expected one of {', '.join(ACTIVATION_DIGITS)}")
    if eagle_of is not None:
        from edgecpm.export.modeling_eagle import EagleCheckpoint

        ckpt = EagleCheckpoint(checkpoint, Checkpoint(eagle_of))
        sparse, quantize = False, "none"  # a head is small and dense
    else:
        ckpt = Checkpoint(checkpoint)
    ckpt.check()
    if sparse:
        ckpt.config = ckpt.config.with_sparse(sparse if isinstance(sparse, dict) else None)
    check_destination(out, force, [checkpoint] + ([Path(eagle_of)] if eagle_of is not None else []))
    if ckpt.quant is not None and quantize is None:
        quantize = "none"  # a GPTQ/AWQ checkpoint is 4-bit, not ternary: skip detection (it dequantizes every linear)
    if quantize_group_size is not None and quantize not in (*MODES, "ternary"):
        raise ValueError(f"--group-size {quantize_group_size}: it applies to --quantize int8, int4 or ternary")
    if quantize == "ternary" and quantize_group_size == -1:
        quantize_group_size = None  # per row: plan()'s default
    quant = None
    if quantize in MODES:
        if dtype not in NUMPY_DTYPE:
            raise ValueError(f"dtype={dtype!r}: the ONNX bundle supports fp32 and fp16")
        quant = QuantPlan(ckpt, quantize, quantize_group_size, NUMPY_DTYPE[dtype])
        ternary = {}
    else:
        ternary = plan(linear_names(ckpt.config.num_hidden_layers),
                       lambda name: ckpt.tensor(name, torch.float32).numpy(), quantize, quantize_group_size)
    head = head_mode(lm_head, bool(quant or ternary))
    scale_dtype = NUMPY_DTYPE.get(dtype, np.float32)
    head_quant = None if head == "dense" else HeadQuant(head, ckpt.config.hidden_size, scale_dtype)
    if ternary_activations != "exact" and not ternary:
        raise ValueError(f"{checkpoint}: ternary_activations={ternary_activations!r} applies to ternary linear "
                         f"weights, and this export has none")
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    head_ids = None
    if frspec is not None:
        head_ids = load_freq_table(frspec, ckpt.config.vocab_size, ckpt.config.eos_token_ids)
    try:
        _write_bundle(ckpt, tmp, dtype, progress, head_ids, ternary, ternary_activations, quant, head_quant)
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        if out.exists():  # an earlier bundle (check_destination): kept until the new one is in place
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists():
                old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_destination(out: Path, force: bool, sources: list[Path]) -> None:
    """Refuse an output folder whose replacement could lose something the user owns."""
    target = out.resolve()
    for src in sources:
        src = src.resolve()
        if target == src or target in src.parents:
            what = "the checkpoint" if target == src else "a folder holding the checkpoint"
            raise BundleError(f"{out}: this is {what} "
                              f"{src}; export into a new folder, e.g. -o {src.name}-bundle")
    if not out.exists():
        return
    if not force:
        raise BundleError(f"{out}: already exists; pass --force to replace it (only an edgecpm bundle is replaced)")
    if not (out / MANIFEST).is_file():
        raise BundleError(f"{out}: exists and is not an edgecpm bundle (no {MANIFEST}); --force replaces only a "
                          f"bundle: choose another -o, or move that folder away yourself")
    read_manifest(out)  # a manifest.json that is not edgecpm's: refused with the reason


def remove_stale_partials(out: Path) -> None:
    """Clean up after exports into `out` whose process is gone (one killed with SIGKILL cannot):
    remove their `.NAME.partial-PID` folders, and put back a `.NAME.replaced-PID` bundle that was
    moved aside when no new bundle took its place."""
    for p in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, pid = p.name[len(out.name) + 2 :].rpartition("-")
        if kind not in ("partial", "replaced") or not pid.isdigit() or _alive(int(pid)) or not p.is_dir():
            continue
        if kind == "replaced" and not out.exists():
            p.rename(out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _write_bundle(ckpt: Checkpoint, folder: Path, dtype: str, progress: bool, head_ids: np.ndarray | None,
                  ternary: dict[str, TernaryInfo], ternary_activations: str, quant: QuantPlan | None = None,
                  head_quant: HeadQuant | None = None) -> None:
    from rich.progress import Progress

    cfg = ckpt.config
    eagle = hasattr(ckpt, "decoder_tensor")  # an EAGLE head, served under the decoder's tensor names
    tensor = ckpt.decoder_tensor if eagle else ckpt.tensor
    writer = ExternalDataWriter(folder / "decoder.onnx.data")
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"exporting {cfg.num_hidden_layers} layers ({dtype})", total=cfg.num_hidden_layers)
        model = build_decoder(
            cfg, dtype,
            tensor=lambda name: tensor(name, torch.float32).numpy(),
            weight_sink=writer.add,
            progress=lambda done, total: bar.update(task, completed=done),
            head_ids=head_ids,
            ternary=ternary,
            eagle=eagle,
            quant=quant,
            head_quant=head_quant,
        )
    writer.close()
    onnx.save(model, folder / "decoder.onnx")
    onnx.checker.check_model(str(folder / "decoder.onnx"), full_check=True)

    tokenizer_files = []
    if any((ckpt.folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        tok = load_tokenizer(ckpt.folder)  # a tokenizer.model is converted: bundles carry tokenizer.json
        tok.save(folder)
        tokenizer_files = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]

    inputs, outputs = graph_io(cfg, dtype, None if head_ids is None else len(head_ids), eagle)
    scale_bytes = 2 if dtype == "fp16" else 4
    files = ["decoder.onnx", "decoder.onnx.data", *tokenizer_files]
    spec = None
    if head_ids is not None:
        np.save(folder / "freq.npy", head_ids.astype(np.int32))
        files.append("freq.npy")
        spec = {"frspec": {"file": "freq.npy", "r": len(head_ids)}}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "exporter": f"edgecpm {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(ckpt.folder.resolve()),
        "dtype": dtype,
        "config": cfg.to_dict(),
        "graphs": {"decoder": {"file": "decoder.onnx", "opset": model.opset_import[0].version,
                               "inputs": inputs, "outputs": outputs}},
        "custom_ops": sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN}),
        "sparse": cfg.to_dict().get("sparse_config"),
        "ternary": {"op": "TernaryMatMul", "activations": ternary_activations,
                    **summary(ternary, scale_bytes)} if ternary else None,
        "quantization": {"mode": quant.mode, **quant_summary(quant.infos, scale_bytes)} if quant else None,
        "lm_head": head_quant.summary(scale_bytes) if head_quant else None,
        "spec": spec,
        "eagle": {"target": str(ckpt.target.folder.resolve())} if eagle else None,
        "tokenizer": {"files": tokenizer_files, "eos_token_ids": sorted(cfg.eos_token_ids)},
        "files": {name: file_record(folder / name) for name in files},
    }
    write_manifest(folder, manifest)
