"""`edgecpm build`: a TensorRT engine for a bundle, built on the device that runs it (DESIGN.md §5, §6, §11).

    build_engine("bundle/", fp16=True)   ->  bundle/engines/<gpu>-trt<version>.engine (+ a manifest record)

Steps: load the plugin library (when the graph has custom ops other than QuantMatMul), write a
TensorRT flavour of the decoder graph next to it (ONNX local functions removed so the parser maps
the custom nodes to the plugins; an int8 / int4 bundle's QuantMatMul and quantized embedding
rewritten into DequantizeLinear + MatMul / Gather, with the rewritten weights in a data file beside
it; see prepare_for_tensorrt), parse, add two optimization profiles (prefill chunks and
decode/verify steps), build with a timing cache kept in bundle/engines/, write the engine
atomically and record it in manifest.json (rewritten atomically). Peak host memory of the build is
reported: Jetson boards share 8-64 GB between CPU and GPU.

Everything that does not need TensorRT -- profile planning, the graph rewrite, the manifest
record -- is a plain function here, tested on CPU (tests/test_tensorrt_host.py, and
tests/test_tensorrt_quant.py, which runs the rewritten quantized graph on onnxruntime). What the device
needs at run time as well -- engine naming and the "built for another GPU / TensorRT" check, the
GPU's identity, the plugin library, the lazy TensorRT and cuda-python imports, profile selection --
lives beside the TensorRT backend, in edgecpm.runtimes.tensorrt_engines. TensorRT itself is
imported lazily.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from edgecpm.bundle import atomic_write_bytes, load_bundle, read_manifest, write_manifest
from edgecpm.errors import BackendUnavailable, BundleError, ConfigError, EdgeCPMError
from edgecpm.runtimes.tensorrt_engines import (
    ENGINES_DIR,
    PLUGIN_LIB_NAME,
    engine_filename,
    gpu_identity,
    import_tensorrt,
    load_plugins,
    n_chunks,
    require_plugin_library,
    slug,
)

TRT_GRAPH = ".decoder.trt.onnx"  # the rewritten graph, beside decoder.onnx so external data resolves
TRT_DATA = ".decoder.trt.onnx.data"  # weights the rewrite made (int8 / int4 bundles: signed, transposed codes)
CUSTOM_DOMAIN = "edgecpm"


# ---- optimization profiles -----------------------------------------------------------------------------
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


# ---- the graph rewrite ---------------------------------------------------------------------------------
def prepare_for_tensorrt(model, base_dir=None, sink=None) -> dict:
    """Rewrites an ONNX ModelProto in place (external data is never loaded as a whole) for TensorRT's parser:
    - removes the ONNX local functions that back the `edgecpm` custom ops (the parser would inline
      them; without them it maps the nodes to the plugins of the same name);
    - casts the InfLLMv2Attention inputs positions (int64) and attn_mask (bool) to int32: TensorRT
      documents bool as unsupported for plugin I/O (one Cast per source tensor, shared by layers);
    - retypes the TernaryMatMul packed codes from uint32 to int32, which TensorRT has (same bytes;
      the kernels read them as uint32);
    - int8 / int4 bundles (no plugin): rewrites each QuantMatMul into DequantizeLinear of its weight
      as signed INT4 / INT8 (blocked along the inputs, opset 21; per channel for int8 with one scale
      a row) feeding a MatMul, plus an exact zero-point term, and the quantized embedding into a
      Gather of DequantizeLinear rows; the opset becomes 21 (export/trt_quant.py). The weights are
      read from base_dir and written through `sink` (a trt_quant.TensorSink; in the model when None).
      Host-checked with onnxruntime, not executed on TensorRT here.
    Returns what was changed."""
    from onnx import TensorProto, helper, numpy_helper

    from edgecpm.export.trt_quant import lower_quant_for_tensorrt

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
    changes = {"functions_removed": removed, "casts": sorted(casts), "retyped": sorted(retyped)}
    quant = lower_quant_for_tensorrt(model, base_dir, sink)
    if quant:
        changes["quantized"] = quant
    return changes


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

    from edgecpm.export.trt_quant import TensorSink

    model = onnx.load(str(bundle_path / graph_file), load_external_data=False)
    try:
        changes = prepare_for_tensorrt(model, bundle_path, TensorSink(bundle_path, TRT_DATA))
        out = bundle_path / TRT_GRAPH
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        onnx.save(model, str(tmp))
        os.replace(tmp, out)
    except BaseException:
        (bundle_path / TRT_DATA).unlink(missing_ok=True)
        raise
    if not any(t.external_data and any(e.value == TRT_DATA for e in t.external_data)
               for t in model.graph.initializer):
        (bundle_path / TRT_DATA).unlink(missing_ok=True)
    return out, changes


# ---- manifest ------------------------------------------------------------------------------------------
def record_engine(manifest: dict, record: dict) -> dict:
    """A copy of the manifest whose "engines" list holds `record` (replacing one for the same file)."""
    new = dict(manifest)
    engines = [e for e in manifest.get("engines") or [] if e.get("file") != record["file"]]
    new["engines"] = engines + [record]
    return new


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (edgecpm.bench.peak_rss_bytes)."""
    from edgecpm.bench import peak_rss_bytes

    return peak_rss_bytes()


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
        (bundle_path / TRT_DATA).unlink(missing_ok=True)

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
    write_manifest(bundle_path, record_engine(read_manifest(bundle_path), record))
    print(f"edgecpm build: wrote {engine} ({len(data) / 2**20:.1f} MiB) in {record['build_seconds']} s; peak host "
          f"memory {record['peak_host_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    return engine
