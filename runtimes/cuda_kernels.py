"""edgecpm's CUDA kernels (plugins/src, behind the C ABI of plugins/include/edgecpm_kernels.h) as the
CUDA implementations of the torch ops edgecpm::infllmv2_attention and edgecpm::ternary_matmul.

The ops' CPU implementations (export/infllmv2.py, export/ternary.py) stay the reference; on a CUDA
tensor torch dispatches to these kernels (registered by runtimes/torch.py, the one device-side
module that may import the export side). The library is
libedgecpm_kernels.so: $EDGECPM_KERNELS_LIB, else build/plugins/ of this source tree, built on
first use by plugins/build_kernels.sh for this GPU's architecture. Missing nvcc or GPU is a
KernelsUnavailable error that says which.

Every call is checked in Python before it reaches the C ABI (devices, dtypes, shapes, contiguity):
the kernels take raw pointers and would read past a wrong shape rather than refuse it. The checks
and the call sequence run on CPU tensors against a fake library in tests/test_cuda_path.py; no
kernel has run through this binding yet (no GPU run was made).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import torch

from edgecpm.config import SparseConfig
from edgecpm.errors import BackendUnavailable

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "plugins" / "build_kernels.sh"
DEFAULT_LIB = ROOT / "build" / "plugins" / "libedgecpm_kernels.so"
LIB_ENV = "EDGECPM_KERNELS_LIB"
ABI_VERSION = 101  # ecpm_version() of include/edgecpm_kernels.h
DTYPES = {torch.float32: 0, torch.float16: 1}  # ecpm_dtype: the kernels compute fp32 or fp16 (not bf16)


class KernelsUnavailable(BackendUnavailable):
    pass


class KernelError(RuntimeError):
    pass


class Config(ctypes.Structure):  # ecpm_infllmv2_config
    _fields_ = [(n, ctypes.c_int32) for n in ("kernel_size", "kernel_stride", "block_size", "init_blocks",
                                              "window_size", "topk", "dense_len", "semantics")]


class Dims(ctypes.Structure):  # ecpm_attn_dims
    _fields_ = [("T", ctypes.c_int64), ("P", ctypes.c_int64), ("Hq", ctypes.c_int32), ("Hkv", ctypes.c_int32),
                ("D", ctypes.c_int32)]


_P, _I, _I64, _SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t
_CFG = ctypes.POINTER(Config)
SIGNATURES = {  # the functions this binding calls: (restype, argtypes), as in the header
    "ecpm_status_string": (ctypes.c_char_p, [_I]),
    "ecpm_version": (_I, []),
    "ecpm_infllmv2_workspace_size": (_SZ, [Dims, _CFG]),
    "ecpm_infllmv2_forward": (_I, [_I, _P, _P, _P, _P, _P, _P, _P, _P, Dims, _CFG, _P, _P, _P, _SZ, _P]),
    "ecpm_ternary_matmul": (_I, [_I, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P]),
}


# ---- finding, building and loading the library ----------------------------------------------------
def library_path() -> Path:
    return Path(os.environ.get(LIB_ENV) or DEFAULT_LIB)


def build(path: Path) -> None:
    """plugins/build_kernels.sh for this GPU's architecture, into path's folder."""
    if shutil.which("nvcc") is None:
        raise KernelsUnavailable(f"{path} is not built and nvcc is not on PATH: install the CUDA toolkit, or build "
                                 f"the kernels elsewhere with plugins/build_kernels.sh and set {LIB_ENV}")
    if not BUILD_SCRIPT.exists():
        raise KernelsUnavailable(f"{path} is not built and {BUILD_SCRIPT} is absent (an installed package without "
                                 f"the plugins/ sources): set {LIB_ENV} to a built libedgecpm_kernels.so")
    major, minor = torch.cuda.get_device_capability()
    env = {**os.environ, "CUDA_ARCHS": f"{major}{minor}", "BUILD_DIR": str(path.parent)}
    res = subprocess.run([str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0 or not path.exists():
        raise KernelsUnavailable(f"building the kernels failed ({BUILD_SCRIPT}):\n{(res.stdout + res.stderr)[-3000:]}")


def load(path: Path | None = None):
    """The ctypes library, built first if absent (needs a CUDA GPU visible to torch)."""
    if not torch.cuda.is_available():
        raise KernelsUnavailable("edgecpm's CUDA kernels need a CUDA GPU visible to torch; none is "
                                 f"(torch {torch.__version__}, CUDA {torch.version.cuda}): run device='cpu'")
    path = Path(path) if path else library_path()
    if not path.exists():
        if path != DEFAULT_LIB:
            raise KernelsUnavailable(f"{LIB_ENV}={path}: no such file")
        build(path)
    return bind(ctypes.CDLL(str(path)))


def bind(lib):
    """Set the signatures and check the ABI version."""
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if lib.ecpm_version() != ABI_VERSION:
        raise KernelsUnavailable(f"libedgecpm_kernels.so has ABI {lib.ecpm_version()}, this edgecpm needs "
                                 f"{ABI_VERSION}: rebuild it with plugins/build_kernels.sh")
    return lib


# ---- argument checks (before any pointer reaches the C ABI) -----------------------------------------
def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"edgecpm CUDA kernel: {what}")


def _same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    _need(len(devices) == 1, f"tensors on several devices {sorted(map(str, devices))}")


def _kernel_dtype(t: torch.Tensor, name: str) -> int:
    _need(t.dtype in DTYPES, f"{name} is {t.dtype}; the kernels compute fp32 or fp16 (run dtype='fp16')")
    return DTYPES[t.dtype]


def check_infllmv2(q, k, v, past_k, past_v, past_ck, positions, mask, cfg: SparseConfig) -> Dims:
    """The shapes of include/edgecpm_kernels.h, or ValueError naming the first that is off."""
    tensors = (q, k, v, past_k, past_v, past_ck, positions, mask)
    _same_device(*tensors)
    _kernel_dtype(q, "q")
    _need(all(t.dtype == q.dtype for t in (k, v, past_k, past_v)), "q, k, v, past_k, past_v differ in dtype")
    _need(past_ck.dtype == torch.float32, f"past_ck is {past_ck.dtype}, not float32")
    _need(all(t.dim() == 3 for t in (q, k, v, past_k, past_v, past_ck)), "q, k, v, past_k, past_v, past_ck are 3-D")
    T, Hq, D = q.shape
    P, Hkv = past_k.shape[:2]
    _need(k.shape == v.shape == (T, Hkv, D), f"k/v {tuple(k.shape)}/{tuple(v.shape)}, want {(T, Hkv, D)}")
    _need(past_v.shape == past_k.shape == (P, Hkv, D), f"past_k/past_v {tuple(past_k.shape)}, want {(P, Hkv, D)}")
    _need(past_ck.shape == (cfg.n_chunks(P), Hkv, D),
          f"past_ck {tuple(past_ck.shape)}, want {(cfg.n_chunks(P), Hkv, D)} (n_chunks({P}))")
    _need(Hkv > 0 and Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    _need(D % 8 == 0 and 0 < D <= 256, f"head_dim {D}: the kernels take D % 8 == 0, D <= 256")
    _need(positions.shape == (T,) and mask.shape == (T, T), f"positions {tuple(positions.shape)} / mask "
          f"{tuple(mask.shape)}, want ({T},) / ({T}, {T})")
    _need(all(t.is_contiguous() for t in tensors), "a tensor is not contiguous (the kernels read token-major rows)")
    return Dims(T, P, Hq, Hkv, D)


def check_ternary(x, packed, scales, in_features: int, group_size: int) -> tuple[int, int, int]:
    """(M, N, K) of y [M, N] = x [M, K] @ W^T, or ValueError."""
    _same_device(x, packed, scales)
    _kernel_dtype(x, "x")
    _need(scales.dtype == x.dtype, f"scales are {scales.dtype}, x is {x.dtype}")
    _need(packed.dtype == torch.int32, f"packed is {packed.dtype}, not int32 (the uint32 words)")
    _need(x.dim() == 2 and packed.dim() == 2 and scales.dim() == 2, "x, packed, scales are 2-D")
    M, K = x.shape
    N = packed.shape[0]
    _need(in_features == K, f"x has {K} features, the weight {in_features}")
    _need(group_size > 0 and K % group_size == 0, f"group_size {group_size} does not divide K={K}")
    _need(packed.shape == (N, -(-K // 16)), f"packed {tuple(packed.shape)}, want {(N, -(-K // 16))}")
    _need(scales.shape == (N, K // group_size), f"scales {tuple(scales.shape)}, want {(N, K // group_size)}")
    _need(all(t.is_contiguous() for t in (x, packed, scales)), "x, packed or scales is not contiguous")
    return M, N, K


# ---- the calls --------------------------------------------------------------------------------------
def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)


def _stream(t: torch.Tensor) -> ctypes.c_void_p:
    """torch's current stream on t's device (0 for a CPU tensor: the tests' fake library)."""
    return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0)


class Kernels:
    def __init__(self, lib):
        self.lib = lib

    def _call(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise KernelError(f"{name}: {self.lib.ecpm_status_string(status).decode()}")

    def infllmv2(self, q, k, v, past_k, past_v, past_ck, positions, mask, cfg: SparseConfig):
        """(out [T, Hq, D], ck_new [Cn, Hkv, D] fp32): the op edgecpm::infllmv2_attention."""
        dims = check_infllmv2(q, k, v, past_k, past_v, past_ck, positions, mask, cfg)
        c = Config(cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.init_blocks, cfg.window_size, cfg.topk,
                   cfg.dense_len, int(cfg.semantics[1:]))
        pos32, mask8 = positions.to(torch.int32), mask.to(torch.uint8)
        out = torch.empty_like(q)
        n_new = cfg.n_chunks(dims.P + dims.T) - cfg.n_chunks(dims.P)
        ck_new = torch.empty(n_new, dims.Hkv, dims.D, dtype=torch.float32, device=q.device)
        ws = torch.empty(int(self.lib.ecpm_infllmv2_workspace_size(dims, ctypes.byref(c))), dtype=torch.uint8,
                         device=q.device)
        self._call("ecpm_infllmv2_forward", DTYPES[q.dtype], _ptr(q), _ptr(k), _ptr(v), _ptr(past_k), _ptr(past_v),
                   _ptr(past_ck), _ptr(pos32), _ptr(mask8), dims, ctypes.byref(c), _ptr(out), _ptr(ck_new), _ptr(ws),
                   ws.numel(), _stream(q))
        return out, ck_new

    def ternary(self, x, packed, scales, in_features: int, group_size: int):
        """y [M, N] in x's dtype: the op edgecpm::ternary_matmul."""
        M, N, K = check_ternary(x, packed, scales, in_features, group_size)
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        self._call("ecpm_ternary_matmul", DTYPES[x.dtype], _ptr(x), _ptr(packed), _ptr(scales), _ptr(y), M, N, K,
                   group_size, _stream(x))
        return y
