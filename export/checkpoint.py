"""Loading a Hugging Face MiniCPM4 checkpoint from safetensors (single file or sharded).

The expected tensor names and shapes come from the torch model itself (built on the meta device),
so the strict check can never drift from the model definition. Tensors are read one at a time
through `safe_open` (memory-mapped), so an 8B checkpoint is never held twice.

A 4-bit GPTQ or AWQ checkpoint (config.json `quantization_config`; export/quantized.py) stores
`X.qweight`, `X.qzeros`, `X.scales` (`X.g_idx`) for a quantized linear `X` instead of `X.weight`:
`check()` expects those names and shapes, and `tensor("X.weight")` returns the exact dequantized
weight, so everything that reads weights by name (load_model, export) works unchanged, in float.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from edgecpm import dtypes
from edgecpm.config import ModelConfig
from edgecpm.errors import CheckpointError
from edgecpm.export import quantized
from edgecpm.export.modeling_minicpm import LongRoPE, MiniCPMForCausalLM, use_ternary
from edgecpm.export.ternary import explain, linear_names, pack, plan, ternary_codes

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """An edgecpm dtype name (or alias: edgecpm.dtypes.canonical) as a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    return _TORCH_DTYPES[dtypes.canonical(name)]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MiniCPMForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class Checkpoint:
    """A checkpoint folder: config + an index of which file holds each tensor."""

    quant: quantized.QuantConfig | None = None  # GPTQ / AWQ, from config.json
    quantized_weights: frozenset[str] = frozenset()  # the "X.weight" names stored quantized (X.qweight present)

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder (expected a Hugging Face checkpoint folder)")
        self.config = ModelConfig.from_file(self.folder)
        self._handles: dict[Path, object] = {}
        self.files = self._tensor_files()
        self.quant = quantized.read_quant_config(self.folder, self.files)
        if self.quant is not None:
            self.quantized_weights = frozenset(n.removesuffix(".qweight") + ".weight" for n in self.files
                                       if n.endswith(".qweight"))

    def _tensor_files(self) -> dict[str, Path]:
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e!r}); re-download it") from None
            files = {name: self.folder / f for name, f in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.exists():
                    raise CheckpointError(f"{f}: listed in {index.name} but missing; re-download the checkpoint")
            return files
        if single.exists():
            names = self._open(single).keys()  # safe_open is not a dict: keys() is its listing
            return dict.fromkeys(names, single)
        raise CheckpointError(
            f"{self.folder}: no model.safetensors or model.safetensors.index.json "
            f"(only safetensors checkpoints are supported; .bin files would need pickle)"
        )

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: corrupted or truncated safetensors file ({e}); "
                                      f"re-download it") from None
        return self._handles[path]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._open(f).get_slice(name).get_shape()) for name, f in self.files.items()}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_shapes(self.config)

    def stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors the files should hold: expected_shapes, with each quantized linear's weight
        replaced by its stored tensors (the optional g_idx / bias only where the files have them)."""
        want = self.expected_shapes()
        if self.quant is None:
            return want
        for name in sorted(self.quantized_weights & set(want)):
            base = name.removesuffix(".weight")
            shape = want.pop(name)
            for suffix, stored in self.quant.stored_shapes(*shape).items():
                if suffix in quantized.REQUIRED or f"{base}.{suffix}" in self.files:
                    want[f"{base}.{suffix}"] = stored
        return want

    def check(self) -> None:
        """Strict name/shape check; the error lists everything that is wrong at once."""
        want, have = self.stored_shapes(), self.shapes()
        missing = sorted(set(want) - set(have))
        unexpected = sorted(set(have) - set(want))
        wrong = sorted(f"{n}: {have[n]} (expected {want[n]})" for n in set(want) & set(have) if want[n] != have[n])
        problems = []
        if missing:
            hint = ""
            if self.quant is not None and any(n.endswith((".qzeros", ".scales")) for n in missing):
                hint = (f" (a quantized linear stores {', '.join(quantized.REQUIRED)}"
                        f"{' and optionally g_idx' if self.quant.method == 'gptq' else ''})")
            problems.append(f"missing tensors: {', '.join(missing)}{hint}")
        if unexpected:
            hint = " (lm_head.weight present but config ties embeddings?)" if "lm_head.weight" in unexpected else ""
            foreign = [f"{n}: {quantized.foreign_tensor(n)}" for n in unexpected if quantized.foreign_tensor(n)]
            if foreign:
                hint += f" ({'; '.join(foreign[:3])}; edgecpm reads the gptq/gptq_v2 and AWQ gemm layouts only)"
            if self.quant is None and any(n.endswith(".qweight") for n in unexpected):
                hint += " (quantized tensors, but config.json has no quantization_config)"
            problems.append(f"unexpected tensors: {', '.join(unexpected)}{hint}")
        if wrong:
            hint = ""
            if self.quant is not None and any(".q" in n or n.endswith(".scales") for n in wrong):
                hint = f" (expected {self.quant.describe()}; edgecpm imports {quantized.SUPPORTED})"
            problems.append(f"wrong shapes: {'; '.join(wrong)}{hint}")
        if self.quant is not None and not self.quantized_weights:
            problems.append(f"{self.quant.source} declares {self.quant.method.upper()} but no tensor is quantized "
                            f"(no *.qweight)")
        if problems:
            raise CheckpointError(f"{self.folder}: weights do not match config.json — " + " | ".join(problems))

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor by name; a quantized linear's "X.weight" is its exact dequantized weight (float32
        before the conversion to dtype)."""
        if name in self.quantized_weights:
            return torch.from_numpy(self.dequantized(name)).to(dtype or torch.float32)
        return self._stored(name, dtype)

    def dequantized(self, name: str) -> np.ndarray:
        """float32 [N, K]: the quantized linear "X.weight" rebuilt from X.qweight, X.qzeros, X.scales (X.g_idx)."""
        base = name.removesuffix(".weight")

        def array(suffix):
            full = f"{base}.{suffix}"
            if full not in self.files:
                return None
            t = self._stored(full)
            return t.float().numpy() if t.is_floating_point() else t.numpy()

        if "_want" not in self.__dict__:
            self._want = self.expected_shapes()
        suffixes = quantized.REQUIRED + quantized.OPTIONAL[self.quant.method]
        return quantized.dequantize(self.quant, {s: array(s) for s in suffixes}, base, self._want.get(name))

    def _stored(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path = self.files[name]
        try:
            t = self._open(path).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({e}); the file may be truncated") from None
        return t if dtype is None else t.to(dtype)

    def weight_dtype(self) -> torch.dtype:
        return self.tensor("model.norm.weight").dtype


def load_model(folder: str | Path, dtype: str | torch.dtype = "fp32",
               ternary: bool | None = None) -> MiniCPMForCausalLM:
    """Build the torch model and fill it with the checkpoint's weights, converted to `dtype`.
    ternary: None keeps the linear weights packed at 2 bits when the checkpoint is ternary (BitCPM4,
    detected exactly as export does), True requires that, False keeps every weight dense."""
    ckpt = Checkpoint(folder)
    ckpt.check()
    dtype = torch_dtype(dtype)
    with torch.device("meta"):
        model = MiniCPMForCausalLM(ckpt.config)
    names = linear_names(ckpt.config.num_hidden_layers)
    def tensor(name):
        return ckpt.tensor(name, torch.float32).numpy()

    if ternary and ckpt.quant is not None:
        raise CheckpointError(f"{ckpt.folder}: ternary=True, but this is a {ckpt.quant.describe()} checkpoint")
    packed = {} if ternary is False or ckpt.quant is not None else plan(names, tensor)
    if ternary and not packed:
        raise CheckpointError(f"{ckpt.folder}: ternary=True, but its linear weights are not ternary "
                              f"(e.g. {names[0]}: {explain(tensor(names[0]))}); load it with ternary=None or False")
    with torch.device("meta"):
        use_ternary(model, packed)
    state = {}
    for name in expected_shapes(ckpt.config):
        if name not in packed:
            state[name] = ckpt.tensor(name, dtype)
            continue
        codes, scales = ternary_codes(tensor(name), packed[name])
        base = name.removesuffix(".weight")
        state[base + ".packed"] = torch.from_numpy(pack(codes).view(np.int32))
        state[base + ".scales"] = torch.from_numpy(scales).to(dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.rope = LongRoPE(ckpt.config)  # its constant buffers were created on meta: build them for real
    return model.eval()
