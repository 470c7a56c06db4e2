"""Safetensors checkpoint files read without torch: the file list of a checkpoint folder, each
file's validated JSON header, and single tensors as numpy arrays (used by `edgecpm inspect` and to
recognize an EAGLE head)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecpm import dtypes
from edgecpm.errors import CheckpointError

# Bytes per element of safetensors dtypes.
ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                  "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
# The floating-point ones edgecpm computes in, by their edgecpm dtype name (edgecpm.dtypes).
ST_FLOAT_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's data lies in a safetensors file (from its validated header)."""

    file: Path
    offset: int  # of the first data byte, from the start of the file
    dtype: str  # the safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ST_DTYPE_BYTES[self.dtype]

    def read_float(self) -> np.ndarray:
        """The values as a float32 array (read from the file, not memory-mapped); F32/F16/BF16 only."""
        if self.dtype not in ST_FLOAT_DTYPES:
            raise CheckpointError(f"{self.file}: a {self.dtype} tensor is not a floating-point weight")
        raw = np.fromfile(self.file, dtypes.numpy_dtype(ST_FLOAT_DTYPES[self.dtype]), self.numel, offset=self.offset)
        return raw.reshape(self.shape).astype(np.float32)


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (name -> {dtype, shape, data_offsets}), validated
    against the file size so a truncated or corrupted file is reported, not half-read."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict, int]:
    """The validated header and the file offset its data_offsets count from."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path}: corrupted safetensors header (claims {n} bytes in a {size}-byte "
                                  f"file); re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupted safetensors header ({e}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object); re-download it")
    header.pop("__metadata__", None)
    for name, t in header.items():
        ok = (isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("data_offsets"), list)
              and len(t["data_offsets"]) == 2 and t.get("dtype") in ST_DTYPE_BYTES)
        if not ok or math.prod(t["shape"]) * ST_DTYPE_BYTES[t["dtype"]] != t["data_offsets"][1] - t["data_offsets"][0]:
            raise CheckpointError(f"{path}: corrupted safetensors header entry for {name!r}; re-download it")
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, the header needs {8 + n + end}); re-download it")
    return header, 8 + n


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e!r}); re-download it") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: listed in {index.name} but missing; re-download the checkpoint")
        return files
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    return []


def checkpoint_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of a checkpoint folder (single or sharded), located from the headers only."""
    tensors = {}
    for f in checkpoint_files(folder):
        header, start = _read_header(f)
        for name, t in header.items():
            tensors[name] = StoredTensor(f, start + t["data_offsets"][0], t["dtype"], tuple(t["shape"]))
    return tensors


def tensor_names(folder: Path) -> set[str]:
    """The tensor names of a checkpoint folder (headers only)."""
    return set(checkpoint_tensors(folder))
