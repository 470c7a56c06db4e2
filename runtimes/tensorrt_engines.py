"""The TensorRT engines of a bundle at run time (DESIGN.md §5, §11): which engine runs here, the
GPU's identity, the plugin library, the optimization profile of a step. The TensorRT backend
(runtimes/tensorrt.py) uses them to run an engine, `edgecpm build` (edgecpm.export.trt_build) to
make and name one; so they sit on the device side and import neither torch nor onnx. TensorRT
and cuda-python are imported lazily (import_tensorrt, import_cudart), and everything else is a
plain function, tested on CPU (tests/test_tensorrt_host.py).

Engines are named <gpu>-trt<version>.engine in bundle/engines/ and recorded in manifest.json with
the GPU, its compute capability and the TensorRT version; an engine built for another GPU or
TensorRT is refused with the reason (engine_mismatch), never run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from edgecpm.errors import BackendUnavailable, ConfigError

PLUGIN_LIB_NAME = "libedgecpm_plugins.so"
PLUGIN_ENV = "EDGECPM_PLUGIN_LIB"
ENGINES_DIR = "engines"
REPO_ROOT = Path(__file__).resolve().parents[1]  # a source checkout / editable install

TENSORRT_HELP = (
    "TensorRT 10.x Python bindings and cuda-python are needed: on Jetson they come with JetPack 6/7 "
    "(`sudo apt install python3-libnvinfer` for the system python; cuda-python: `pip install cuda-python`), on x86 "
    "`pip install 'edgecpm[trt]'` (tensorrt + cuda-python)"
)
PLUGIN_HELP = (
    "build the plugin library on the device: `cmake -S plugins -B plugins/build -DCMAKE_CUDA_ARCHITECTURES=87 "
    "&& cmake --build plugins/build -j` (87 = Orin, 110 = Thor; needs the TensorRT headers, e.g. "
    f"-DTENSORRT_INCLUDE_DIR=/usr/include/aarch64-linux-gnu), or point {PLUGIN_ENV} at it"
)



# ---- lazy imports ---------------------------------------------------------------------------------
def import_tensorrt(what: str = "edgecpm build"):
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"{what}: cannot import tensorrt ({e}); {TENSORRT_HELP}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailable(f"{what}: TensorRT {trt.__version__} found, edgecpm needs TensorRT >= 10 "
                                 f"(IPluginV3 plugins); {TENSORRT_HELP}")
    return trt


def import_cudart(what: str = "edgecpm build"):
    """cuda-python's runtime module (cuda.bindings.runtime in cuda-python >= 12.6, cuda.cudart before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise BackendUnavailable(f"{what}: cannot import cuda-python ({e}); {TENSORRT_HELP}") from None
    return cudart


# ---- names, identities, checks -------------------------------------------------------------------------
def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'Orin (nvgpu)' -> 'orin-nvgpu'."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "gpu"


def engine_filename(gpu_name: str, trt_version: str) -> str:
    return f"{slug(gpu_name)}-trt{slug(trt_version)}.engine"


def engine_mismatch(record: dict, gpu_name: str, compute_capability: str, trt_version: str) -> str | None:
    """Why an engine recorded in the manifest cannot run here, or None when it can. Engines are
    specific to the TensorRT version (serialization) and to the GPU (kernels and tactics)."""
    if record.get("tensorrt") != trt_version:
        return (f"{record.get('file')} was built with TensorRT {record.get('tensorrt')}, this device has TensorRT "
                f"{trt_version}")
    if record.get("compute_capability") != compute_capability or record.get("gpu") != gpu_name:
        return (f"{record.get('file')} was built for {record.get('gpu')} (compute capability "
                f"{record.get('compute_capability')}), this device is {gpu_name} ({compute_capability})")
    return None


def find_engine(manifest: dict, gpu_name: str, compute_capability: str,
                trt_version: str) -> tuple[dict | None, list[str]]:
    """The manifest's engine for this GPU and TensorRT, and the reasons every other one was refused."""
    reasons = []
    for rec in manifest.get("engines") or []:
        why = engine_mismatch(rec, gpu_name, compute_capability, trt_version)
        if why is None:
            return rec, reasons
        reasons.append(why)
    return None, reasons


def gpu_identity() -> tuple[str, str]:
    """(device name, compute capability 'major.minor') of GPU 0, through cuda-python."""
    cudart = import_cudart()
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise BackendUnavailable(f"no CUDA device usable (cudaGetDeviceProperties: {err}); is this the device "
                                 f"the engine is for, and does the process see the GPU?")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00").strip(), f"{props.major}.{props.minor}"


def find_plugin_library(explicit: str | Path | None = None) -> Path | None:
    """The plugin library: explicit path, else $EDGECPM_PLUGIN_LIB, else plugins/build/ or
    build/plugins/ of the source tree edgecpm runs from. None when none exists."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise BackendUnavailable(f"plugin library {path} not found; {PLUGIN_HELP}")
        return path
    if os.environ.get(PLUGIN_ENV):
        path = Path(os.environ[PLUGIN_ENV])
        if not path.is_file():
            raise BackendUnavailable(f"{PLUGIN_ENV}={path}: no such file; {PLUGIN_HELP}")
        return path
    for path in (REPO_ROOT / "plugins" / "build" / PLUGIN_LIB_NAME, REPO_ROOT / "build" / "plugins" / PLUGIN_LIB_NAME):
        if path.is_file():
            return path
    return None


_LOADED_PLUGIN_LIBS: set[str] = set()


def load_plugins(trt, lib: Path) -> None:
    """Registers the plugin library with TensorRT once per process (a second load_library of the
    same creators fails, e.g. for a draft model's backend next to the target's)."""
    registry = trt.get_plugin_registry()
    get = getattr(registry, "get_creator", None)
    if str(lib) in _LOADED_PLUGIN_LIBS or (get is not None and get("InfLLMv2Attention", "1", "") is not None):
        return
    if not registry.load_library(str(lib)):
        raise BackendUnavailable(f"TensorRT could not load the plugin library {lib} (built for another TensorRT or "
                                 f"CUDA?); {PLUGIN_HELP}")
    _LOADED_PLUGIN_LIBS.add(str(lib))


# Custom ops `edgecpm build` rewrites into standard ONNX ops for TensorRT (export/trt_quant.py): no plugin.
REWRITTEN_OPS = frozenset({"QuantMatMul"})


def needs_plugins(manifest: dict) -> bool:
    return any(op not in REWRITTEN_OPS for op in manifest.get("custom_ops") or [])


def require_plugin_library(manifest: dict, explicit=None, what: str = "edgecpm build") -> Path | None:
    """The plugin library when the graph has custom ops (None otherwise), or a clear error."""
    if not needs_plugins(manifest):
        return None
    path = find_plugin_library(explicit)
    if path is None:
        raise BackendUnavailable(f"{what}: the graph uses the custom ops {manifest['custom_ops']}, which run as "
                                 f"TensorRT plugins from {PLUGIN_LIB_NAME}; {PLUGIN_HELP}")
    return path


# ---- optimization profiles -----------------------------------------------------------------------------
def n_chunks(length: int, sparse: dict | None) -> int:
    if not sparse:
        return 0
    ks, st = sparse["kernel_size"], sparse["kernel_stride"]
    return 0 if length < ks else (length - ks) // st + 1


def select_profile(profiles: list[dict], T: int, P: int) -> int:
    """The profile index for a step of T new tokens over P cached ones: the tightest T range that
    holds it (decode/verify for small T). Raises when none does."""
    fits = [(p["dims"]["T"][2], i) for i, p in enumerate(profiles)
            if p["dims"]["T"][0] <= T <= p["dims"]["T"][2] and p["dims"]["P"][0] <= P <= p["dims"]["P"][2]]
    if not fits:
        t_max = max(p["dims"]["T"][2] for p in profiles)
        p_max = max(p["dims"]["P"][2] for p in profiles)
        raise ConfigError(f"a step of {T} tokens after {P} cached ones is outside the engine's profiles (T <= {t_max}, "
                          f"P <= {p_max}); rebuild with a larger --max-prefill/--max-context or lower kv_budget")
    return min(fits)[1]
