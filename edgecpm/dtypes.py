"""The compute / KV-cache dtypes by the names edgecpm's API and CLI use: "fp32", "fp16", "bf16".

One table for the CLI's choices, the bytes per element (`edgecpm inspect`), the numpy dtype of a
KV arena (bf16 is ml_dtypes.bfloat16, which has torch.bfloat16's bits) and the torch dtype on the
export side (`edgecpm.export.checkpoint.torch_dtype`). numpy, torch and safetensors spellings
("float16", "torch.bfloat16", "BF16") are understood as aliases.
"""

from __future__ import annotations

import numpy as np

NAMES = ("fp32", "fp16", "bf16")
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "f32": "fp32", "f16": "fp16"}


def canonical(name) -> str:
    """'fp16', 'float16', 'F16', np.float16, torch.float16 ... -> 'fp16'; a ValueError otherwise."""
    text = str(name) if not isinstance(name, (type, np.dtype)) else np.dtype(name).name
    key = text.lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in ITEMSIZE:
        raise ValueError(f"dtype={name!r}: expected one of {', '.join(NAMES)}")
    return key


def numpy_dtype(name) -> np.dtype:
    """The numpy dtype of a name; bf16 imports ml_dtypes (about 0.5 s) only when asked for."""
    key = canonical(name)
    if key == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"fp32": np.float32, "fp16": np.float16}[key])
