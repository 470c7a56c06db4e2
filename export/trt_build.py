"""`edgecpm build`: a TensorRT engine for a bundle, built on the device that runs it (DESIGN.md §5, §6, §11).

    build_engine("bundle/", fp16=True)   ->  bundle/engines/<gpu>-trt<version>.engine (+ a manifest record)

Steps: load the plugin library (when the graph has custom ops), write a TensorRT flavour of the
decoder graph next to it (ONNX local functions removed so the parser maps the custom nodes to the
plugins; see prepare_for_tensorrt), parse, add two optimization profiles (prefill chunks and
decode/verify steps), build with a timing cache kept in bundle/engines/, write the engine
atomically and record it in manifest.json (rewritten atomically). Peak host memory of the build is
reported: Jetson boards share 8-64 GB between CPU and GPU.

Everything that does not need TensorRT -- engine naming, profile planning, the graph rewrite, the
manifest record, the "built for another GPU / TensorRT" check -- is a plain function here, tested
on CPU (tests/test_tensorrt_host.py). TensorRT itself is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

from edgecpm.bundle import MANIFEST, load_bundle
from edgecpm.errors import BackendUnavailable, BundleError, ConfigError, EdgeCPMError

PLUGIN_LIB_NAME = "libedgecpm_plugins.so"
PLUGIN_ENV = "EDGECPM_PLUGIN_LIB"
ENGINES_DIR = "engines"
TRT_GRAPH = ".decoder.trt.onnx"  # the rewritten graph, beside decoder.onnx so external data resolves
CUSTOM_DOMAIN = "edgecpm"
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


def needs_plugins(manifest: dict) -> bool:
    return bool(manifest.get("custom_ops"))


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


def plan_profiles(manifest: dict, max_prefill: int = 512, max_verify: int = 64,
                  max_context: int | None = None) -> list[dict]:
    """Two optimization profiles as dim ranges [min, opt, max]: 0 'prefill' (T up to max_prefill),
    1 'decode' (decode steps and tree verification, T up to max_verify). P, the cached tokens before
    a step, runs from 0 to max_context - 1 (the config's max_position_embeddings by default); C
    (compressed keys) follows P; N (logit rows) runs from 0 (prefill chunks that want none) to T."""
    cfg = manifest["config"]
    limit = int(cfg["max_position_embeddings"])
    max_context = limit if max_context is None else int(max_context)
    if not 1 <= max_context <= limit:
        raise ConfigError(f"--max-context {max_context}: must be in [1, {limit}] (max_position_embeddings)")
    if not 1 <= max_verify <= max_prefill:
        raise ConfigError(f"--max-verify {max_verify} / --max-prefill {max_prefill}: need "
                          f"1 <= max_verify <= max_prefill")
    if max_prefill > max_context:
        raise ConfigError(f"--max-prefill {max_prefill} exceeds the context of {max_context} tokens")
    sparse = manifest.get("sparse")
    p_max = max_context - 1
    p_opt = p_max // 2
    profiles = []
    for name, t_max, t_opt in (("prefill", max_prefill, max_prefill), ("decode", max_verify, 1)):
        dims = {"T": [1, t_opt, t_max], "P": [0, p_opt, p_max], "N": [0, 1, t_max]}
        if sparse:
            dims["C"] = [n_chunks(v, sparse) for v in dims["P"]]
        profiles.append({"name": name, "dims": dims})
    return profiles


def profile_shapes(inputs: list[dict], profile: dict) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Input name -> (min, opt, max) shapes, the manifest's symbolic dims replaced by the profile's."""
    out = {}
    for spec in inputs:
        shapes = []
        for i in range(3):
            shape = []
            for d in spec["shape"]:
                if isinstance(d, int):
                    shape.append(d)
                elif d in profile["dims"]:
                    shape.append(profile["dims"][d][i])
                else:
                    raise BundleError(f"graph input {spec['name']}: dimension {d!r} has no range in the build "
                                      f"profiles; re-export the bundle with this edgecpm")
            shapes.append(tuple(shape))
        out[spec["name"]] = tuple(shapes)
    return out


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


# ---- the graph rewrite ---------------------------------------------------------------------------------
def prepare_for_tensorrt(model) -> dict:
    """Rewrites an ONNX ModelProto in place (external data is never loaded) for TensorRT's parser:
    - removes the ONNX local functions that back the `edgecpm` custom ops (the parser would inline
      them; without them it maps the nodes to the plugins of the same name);
    - casts the InfLLMv2Attention inputs positions (int64) and attn_mask (bool) to int32: TensorRT
      documents bool as unsupported for plugin I/O (one Cast per source tensor, shared by layers);
    - retypes the TernaryMatMul packed codes from uint32 to int32, which TensorRT has (same bytes;
      the kernels read them as uint32).
    Returns what was changed."""
    from onnx import TensorProto, helper, numpy_helper

    foreign = sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})
    if foreign:
        raise BundleError(f"the graph uses onnxruntime-only ops {foreign} (a ternary bundle exported for "
                          f"onnxruntime's MatMulNBits); re-export it with TernaryMatMul to build a TensorRT engine")
    custom = {(n.domain, n.op_type) for n in model.graph.node if n.domain == CUSTOM_DOMAIN}
    removed = [f.name for f in model.functions if (f.domain, f.name) in custom]
    kept = [f for f in model.functions if (f.domain, f.name) not in custom]
    del model.functions[:]
    model.functions.extend(kept)

    casts, nodes = {}, []

    def as_int32(name: str) -> str:  # one Cast per source, placed before its first consumer
        if name not in casts:
            casts[name] = f"{name}.int32"
            nodes.append(helper.make_node("Cast", [name], [casts[name]], to=TensorProto.INT32,
                                          name=f"edgecpm_trt_cast_{len(casts)}"))
        return casts[name]

    initializers = {t.name: t for t in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant" and n.output}
    retyped = set()
    for node in model.graph.node:
        if node.domain == CUSTOM_DOMAIN and node.op_type == "InfLLMv2Attention":
            node.input[6] = as_int32(node.input[6])
            node.input[7] = as_int32(node.input[7])
        elif node.domain == CUSTOM_DOMAIN and node.op_type == "TernaryMatMul" and node.input[1] not in retyped:
            name = node.input[1]
            tensor = initializers.get(name)
            if tensor is None and name in constants:
                tensor = next((a.t for a in constants[name].attribute if a.name == "value"), None)
            if tensor is None:
                raise BundleError(f"TernaryMatMul node {node.name}: packed codes {name!r} are not a constant; "
                                  f"re-export the bundle")
            _retype_uint32(tensor, TensorProto, numpy_helper)
            retyped.add(name)
        copy = type(node)()
        copy.CopyFrom(node)  # the list below replaces the graph's: keep no references into it
        nodes.append(copy)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return {"functions_removed": removed, "casts": sorted(casts), "retyped": sorted(retyped)}


def _retype_uint32(tensor, TensorProto, numpy_helper) -> None:
    if tensor.data_type == TensorProto.INT32:
        return
    if tensor.data_type != TensorProto.UINT32:
        raise BundleError(f"TernaryMatMul packed codes {tensor.name}: expected uint32, got "
                          f"{TensorProto.DataType.Name(tensor.data_type)}; re-export the bundle")
    if tensor.data_location == TensorProto.EXTERNAL or tensor.HasField("raw_data"):
        tensor.data_type = TensorProto.INT32  # raw little-endian bytes are the same
        return
    values = numpy_helper.to_array(tensor)  # uint32 kept in uint64_data: rewrite as raw int32 bytes
    tensor.ClearField("uint64_data")
    tensor.data_type = TensorProto.INT32
    tensor.raw_data = values.astype("uint32").view("int32").tobytes()


def write_trt_graph(bundle_path: Path, graph_file: str) -> tuple[Path, dict]:
    """The rewritten graph, saved beside the original (so its external-data references stay valid)."""
    try:
        import onnx
    except ImportError as e:
        raise BackendUnavailable(f"edgecpm build: cannot import onnx ({e}), needed to prepare the graph for "
                                 f"TensorRT's parser; `pip install onnx`") from None

    model = onnx.load(str(bundle_path / graph_file), load_external_data=False)
    changes = prepare_for_tensorrt(model)
    out = bundle_path / TRT_GRAPH
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)
    return out, changes


# ---- manifest ------------------------------------------------------------------------------------------
def record_engine(manifest: dict, record: dict) -> dict:
    """A copy of the manifest whose "engines" list holds `record` (replacing one for the same file)."""
    new = dict(manifest)
    engines = [e for e in manifest.get("engines") or [] if e.get("file") != record["file"]]
    new["engines"] = engines + [record]
    return new


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(bundle_path: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(bundle_path) / MANIFEST, json.dumps(manifest, indent=1).encode())


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- the build -----------------------------------------------------------------------------------------
def _progress_monitor(trt, enabled: bool):
    """A TensorRT IProgressMonitor drawing rich progress bars, or None."""
    if not enabled or not hasattr(trt, "IProgressMonitor"):
        return None
    from rich.progress import Progress

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bar = Progress(transient=True)
            self.tasks = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if not self.tasks:
                self.bar.start()
            self.tasks[phase_name] = self.bar.add_task(phase_name, total=num_steps)

        def step_complete(self, phase_name, step):
            if phase_name in self.tasks:
                self.bar.update(self.tasks[phase_name], completed=step + 1)
            return True

        def phase_finish(self, phase_name):
            task = self.tasks.pop(phase_name, None)
            if task is not None:
                self.bar.remove_task(task)
            if not self.tasks:
                self.bar.stop()

    return Monitor()


def build_engine(bundle_path, fp16: bool = False, max_prefill: int = 512, max_verify: int = 64, plugin_lib=None,
                 timing_cache=None, progress: bool = True, max_context: int | None = None) -> Path:
    """Build and record the TensorRT engine of a bundle for this device. Returns the engine path.
    fp16: let TensorRT run an fp32 bundle's layers in fp16 (an fp16 bundle is built strongly typed,
    keeping the exported precisions: fp16 matmuls, fp32 norms and softmax)."""
    bundle_path = Path(bundle_path)
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    profiles = plan_profiles(manifest, max_prefill, max_verify, max_context)  # bad arguments fail first
    trt = import_tensorrt()
    lib = require_plugin_library(manifest, plugin_lib)
    gpu, cc = gpu_identity()
    version = str(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    if lib is not None:
        load_plugins(trt, lib)

    engines = bundle_path / ENGINES_DIR
    engines.mkdir(exist_ok=True)
    cache_path = Path(timing_cache) if timing_cache else engines / f"{slug(gpu)}-trt{slug(version)}.timing-cache"
    graph = manifest["graphs"]["decoder"]
    t0 = time.time()
    trt_graph, changes = write_trt_graph(bundle_path, graph["file"])
    try:
        builder = trt.Builder(logger)
        strongly_typed = manifest["dtype"] == "fp16" and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(trt_graph)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(f"{bundle_path / graph['file']}: TensorRT {version} could not parse the graph: {errors}")
        config = builder.create_builder_config()
        if fp16 and not strongly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        monitor = _progress_monitor(trt, progress)
        if monitor is not None:
            config.progress_monitor = monitor
        for prof in profiles:
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile_shapes(graph["inputs"], prof).items():
                p.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(p)
        print(f"edgecpm build: {gpu} (sm {cc}), TensorRT {version}, profiles "
              + ", ".join(f"{p['name']} T<={p['dims']['T'][2]}" for p in profiles)
              + f", context {profiles[0]['dims']['P'][2] + 1}", file=sys.stderr)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EdgeCPMError(f"{bundle_path}: TensorRT {version} failed to build the engine (see its log above)")
        data = bytes(serialized)
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    finally:
        trt_graph.unlink(missing_ok=True)

    engine = engines / engine_filename(gpu, version)
    atomic_write_bytes(engine, data)
    record = {
        "file": f"{ENGINES_DIR}/{engine.name}",
        "gpu": gpu,
        "compute_capability": cc,
        "tensorrt": version,
        "fp16": bool(fp16 or manifest["dtype"] == "fp16"),
        "strongly_typed": strongly_typed,
        "profiles": profiles,
        "max_context": profiles[0]["dims"]["P"][2] + 1,
        "plugins": PLUGIN_LIB_NAME if lib is not None else None,
        "graph_changes": changes,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.time() - t0, 1),
        "peak_host_rss_bytes": peak_rss_bytes(),
    }
    write_manifest(bundle_path, record_engine(json.loads((bundle_path / MANIFEST).read_text()), record))
    print(f"edgecpm build: wrote {engine} ({len(data) / 2**20:.1f} MiB) in {record['build_seconds']} s; peak host "
          f"memory {record['peak_host_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    return engine
