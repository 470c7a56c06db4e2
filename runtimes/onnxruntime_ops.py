"""edgecpm's onnxruntime custom-op library (onnxruntime_ops.cpp): the CPU kernels of TernaryMatMul,
QuantMatMul, HeadMatMul (a tied LM head) and the fused Attention, compiled on first use and cached.

Building it needs a C++17 compiler (`$CXX`, else `c++`) and onnxruntime's C API headers, which
the onnxruntime wheel does not ship: `$ONNXRUNTIME_INCLUDE_DIR`, else /usr/include/onnxruntime
(Debian/Ubuntu package libonnxruntime-dev) or /usr/local/include/onnxruntime. The headers may be
older than the installed onnxruntime (its C API is backward compatible), not newer. The library
lands in `$EDGECPM_CACHE` (default ~/.cache/edgecpm)/ort_ops/<key>/, the key covering the source,
the headers' API version and the compiler, so an edit or an upgrade builds a fresh one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgecpm.errors import BackendUnavailable

SOURCE = Path(__file__).with_name("onnxruntime_ops.cpp")
HEADER = "onnxruntime_lite_custom_op.h"
_INCLUDE_DIRS = ("/usr/include/onnxruntime", "/usr/local/include/onnxruntime")


def _include_dir() -> Path:
    env = os.environ.get("ONNXRUNTIME_INCLUDE_DIR")
    for d in [env] if env else _INCLUDE_DIRS:
        if (Path(d) / HEADER).is_file():
            return Path(d)
    where = f"ONNXRUNTIME_INCLUDE_DIR={env}" if env else " or ".join(_INCLUDE_DIRS)
    raise BackendUnavailable(f"onnxruntime's C API headers ({HEADER}) are not in {where}: install "
                             "libonnxruntime-dev or point ONNXRUNTIME_INCLUDE_DIR at an onnxruntime release's include/")


def _api_version(include: Path) -> int:
    found = re.search(r"#define ORT_API_VERSION (\d+)", (include / "onnxruntime_c_api.h").read_text())
    if not found:
        raise BackendUnavailable(f"{include / 'onnxruntime_c_api.h'}: no ORT_API_VERSION")
    return int(found.group(1))


@functools.cache
def library() -> Path:
    """The built library (building it the first time); BackendUnavailable says why it cannot be."""
    import onnxruntime

    include = _include_dir()
    api = _api_version(include)
    runtime = int(onnxruntime.__version__.split(".")[1])
    if api > runtime:
        raise BackendUnavailable(f"the headers in {include} are for onnxruntime 1.{api}, newer than the installed "
                                 f"{onnxruntime.__version__}")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise BackendUnavailable("no C++ compiler: set CXX or install g++")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), str(api).encode(), cxx.encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("EDGECPM_CACHE", Path.home() / ".cache" / "edgecpm"))
    out = cache / "ort_ops" / key / "libedgecpm_ort_ops.so"
    if out.is_file():
        return out
    print(f"edgecpm: building edgecpm's onnxruntime kernels into {out.parent} (once)", file=sys.stderr,
          flush=True)
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", f"-I{include}", str(SOURCE), "-o"]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final name and renamed: a concurrent or interrupted build never leaves a
        # half-written library where a session would load it.
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            part = Path(tmp) / out.name
            done = subprocess.run([*cmd, str(part)], check=False, capture_output=True, text=True)
            if done.returncode:
                raise BackendUnavailable(f"building {SOURCE.name} failed ({' '.join(cmd)} ...):\n{done.stderr[-2000:]}")
            os.replace(part, out)
    except OSError as e:
        raise BackendUnavailable(f"cannot build {SOURCE.name} into {out.parent} ({e}); set EDGECPM_CACHE to a "
                                 "writable folder, CXX to a C++ compiler") from None
    return out


def isa(path: Path) -> str:
    """The kernel path the library takes on this CPU: "avx512vnni", "avx512", "avx2vnni", "avx2" or "scalar"."""
    lib = ctypes.CDLL(str(path))
    lib.edgecpm_ort_ops_isa.restype = ctypes.c_char_p
    return lib.edgecpm_ort_ops_isa().decode()
