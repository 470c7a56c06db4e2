"""The onnxruntime backend: runs a bundle's decoder graph with IOBinding.

Each step binds the KV arena's past rows as `past_key.{i}`/`past_value.{i}` and the arena's next
rows as the `key.{i}`/`value.{i}` outputs, by pointer: the cache is never copied, and the new
keys/values land directly where the next step reads them. CUDA EP is used when present (the arena
then lives in host memory and is copied per step — fine for checks, the TensorRT backend is the
fast GPU path); CPU EP otherwise.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import numpy as np

from edgecpm import dtypes
from edgecpm.bundle import Bundle
from edgecpm.errors import BackendUnavailable, BundleError
from edgecpm.kv_cache import KVCache

# What can run a ternary bundle's TernaryMatMul nodes (OnnxRuntimeBackend's `ternary`).
TERNARY_KERNELS = ("auto", "edgecpm", "matmulnbits", "reference")
# What runs the dense attention (OnnxRuntimeBackend's `attention`; default $EDGECPM_ORT_ATTENTION, else auto).
ATTENTION_KERNELS = ("auto", "edgecpm", "reference")
# What runs an int8 / int4 bundle's QuantMatMul nodes (OnnxRuntimeBackend's `quant`; default
# $EDGECPM_ORT_QUANT, else auto). "matmulnbits-int8act" rounds activations to int8: faster, lossy, opt-in.
QUANT_KERNELS = ("auto", "edgecpm", "matmulnbits", "matmulnbits-int8act")
# Prefill tokens per step when edgecpm's fused attention runs: no [T, P] scores exist, so the chunk
# is sized for the linears' GEMMs, not bounded by the context.
FUSED_PREFILL_CHUNK = 512
_ORT_TYPE = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
             "tensor(bool)": "bool"}


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("backend 'onnxruntime' needs onnxruntime: pip install 'edgecpm[ort]'") from None
    return onnxruntime


def _tied_head_in_place(model) -> str | None:
    """A dense tied embedding / LM head (one initializer read by the embedding's Gather and the head's
    Gemm) declared a graph input too, so that onnxruntime neither prepacks nor folds it: prepacking
    gives the Gemm its own copy, while packing it pages in the whole memory-mapped original, which the
    Gather keeps — the matrix twice in RSS (300 MiB for MiniCPM4-0.5B in fp32). Measured on the
    0.5B head, one thread: an unpacked decode GEMV costs 23 ms against 22 packed. Returns the
    matrix's name where the graph has one (else None)."""
    from onnx import helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits}
    head = next((n.input[1] for n in graph.node if n.op_type == "Gemm" and n.input[1] in gathered), None)
    if head is None or any(i.name == head for i in graph.input):
        return None
    t = inits[head]
    graph.input.append(helper.make_tensor_value_info(head, t.data_type, list(t.dims)))
    return head


def _head_to_kernel(model, head: str) -> bool:
    """The tied head's Gemm (x [N, H] times `head` [V, H] transposed) becomes edgecpm::HeadMatMul
    (runtimes/onnxruntime_ops.cpp). Unprepacked, onnxruntime's Gemm copies the whole matrix into its
    packed layout at every call of two rows or more, so verifying even a one-token draft cost a copy
    of the head more than a decode step; the kernel reads it in place (benchmarks/kernels.py, "tied
    head"). Returns whether the Gemm was the plain product it replaces (no bias, alpha 1, transB)."""
    from onnx import helper

    for i, node in enumerate(model.graph.node):
        if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] != head:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("transB", 0) != 1 or attrs.get("alpha", 1.0) != 1.0:
            return False
        model.graph.node[i].CopyFrom(helper.make_node("HeadMatMul", list(node.input), list(node.output),
                                                      name=f"{node.name or node.output[0]}/head", domain="edgecpm"))
        if not any(o.domain == "edgecpm" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("edgecpm", 1))
        return True
    return False


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: int | None = None, providers: list[str] | None = None,
                 ternary: str = "auto", attention: str | None = None, quant: str | None = None,
                 spin: bool | None = None):
        """ternary: what runs a ternary bundle's TernaryMatMul nodes (runtimes/ternary_lowering.py):
        "edgecpm", the exact fp32 kernel of runtimes/onnxruntime_ops.cpp (built on first use);
        "matmulnbits", onnxruntime's 2-bit kernel on the bundle's `ternary_activations` digits;
        "auto", edgecpm's kernel for an fp32 bundle exported with exact activations when it can be
        built here (else MatMulNBits, with a warning that says why) and has a vector path for this
        CPU (x86-64: AVX-512 or AVX2), MatMulNBits for the others;
        "reference", the op's reference function (for checks: onnxruntime folds it into dense fp32
        weights at load). `ternary_kernel` says which runs.
        attention: what runs the graph's dense attention (runtimes/attention_lowering.py):
        "edgecpm", the fused kernel of runtimes/onnxruntime_ops.cpp swapped in at load (fp32, CPU);
        "auto" (default, or $EDGECPM_ORT_ATTENTION), that kernel for an fp32 bundle on CPU where the
        library builds and has a vector path here, else the graph as exported; "reference", the graph
        as exported. `attention_kernel` says which runs (None: the exported graph), and
        `max_prefill_chunk` the prefill step size it suits (None: the context bounds it).
        A dense tied LM head runs on edgecpm's HeadMatMul kernel where the fused attention would by
        default (fp32, CPU, a vector path here; dense or sparse), unless attention is "reference";
        `head_kernel` says so (None: the graph's Gemm).
        quant: what runs an int8 / int4 bundle's QuantMatMul nodes (also a quantized LM head):
        "edgecpm", the fp32-activation kernel of runtimes/onnxruntime_ops.cpp; "matmulnbits",
        onnxruntime's MatMulNBits with fp32 activations (runtimes/quant_lowering.py);
        "matmulnbits-int8act", MatMulNBits rounding the activations to int8 (accuracy_level 4: lossy);
        "auto" (default, or $EDGECPM_ORT_QUANT), edgecpm's kernel for an fp32 bundle on CPU where the
        library builds and has a vector path here (x86-64: AVX-512 or AVX2), else MatMulNBits with
        fp32 activations.
        `quant_kernel` says which runs (None: no QuantMatMul nodes).
        spin: whether onnxruntime's idle intra-op threads spin-wait for the next op within a run
        (None: $EDGECPM_ORT_SPIN "0" / "1", else yes)."""
        ort = _import_ort()
        self.bundle, self.config = bundle, bundle.config
        graph = bundle.graph("decoder")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Spin-waiting: a sleeping worker takes a wake-up per parallel op (~150 a decode token), so a
        # session decodes faster spinning (0.5B ternary, 2 threads: 1.34x, benchmarks/kernels.py) ...
        if spin is None:
            spin = os.environ.get("EDGECPM_ORT_SPIN", "1") != "0"
        self.spin, self.threads = spin, threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # ... within a run only: the workers stop spinning when a run returns, so the Python between
        # steps (sampling, drafting, binding) and another session's run (a target and its draft
        # model take turns) have the cores; one wake-up per run instead. Wind-tunnel target, 2
        # threads, ad hoc A/B of 5 process pairs: plain decoding 1.04x, n-gram speculative decoding
        # 1.09x faster than with the workers spinning on between runs.
        opts.add_session_config_entry("session.force_spinning_stop", "1" if spin else "0")
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        model, self.ternary_kernel, self.attention_kernel, self.quant_kernel, self.head_kernel = self._decoder_model(
            graph, ternary, attention, quant, opts, providers)
        self.max_prefill_chunk = FUSED_PREFILL_CHUNK if self.attention_kernel else None
        self.session = ort.InferenceSession(model, opts, providers=providers)
        self.providers = self.session.get_providers()
        self._check_io(graph)
        self.kv_dtype = dtypes.numpy_dtype(next(d["dtype"] for d in graph["inputs"] if d["name"] == "past_key.0"))
        self.weight_bytes = bundle.file(graph["file"] + ".data").stat().st_size
        self.binding = self.session.io_binding()
        self._layers = range(self.config.num_hidden_layers)
        self.sparse = self.config.sparse is not None
        # The vocabulary, or r for an FR-Spec draft head.
        self.n_logits = next(d["shape"][1] for d in graph["outputs"] if d["name"] == "logits")
        # Bundles exported before the `hidden` output still load; an EAGLE drafter needs it.
        self.has_hidden = any(d["name"] == "hidden" for d in graph["outputs"])
        self.last_hidden: np.ndarray | None = None  # [T, H] float32: the last step's `hidden` rows

    def on_keep(self, start: int, rows) -> None:
        """The arena is bound by pointer at every step: nothing of it is kept here."""

    def _decoder_model(self, graph: dict, ternary: str, attention: str | None, quant: str | None, opts,
                       providers: list[str]) -> tuple[bytes, str | None, str | None, str | None, str | None]:
        """The decoder graph to load, rewritten in memory (its weights still read from the bundle's
        external data file), what runs the ternary linears (None: there are none), what runs
        attention (None: the graph's own ops), what runs the QuantMatMul nodes (None: none) and
        what runs a tied LM head (None: the graph's Gemm, or no tied head)."""
        import os

        if ternary not in TERNARY_KERNELS:
            raise ValueError(f"ternary={ternary!r}: expected one of {', '.join(TERNARY_KERNELS)}")
        attention = attention or os.environ.get("EDGECPM_ORT_ATTENTION") or "auto"
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention={attention!r}: expected one of {', '.join(ATTENTION_KERNELS)}")
        quant = quant or os.environ.get("EDGECPM_ORT_QUANT") or "auto"
        if quant not in QUANT_KERNELS:
            raise ValueError(f"quant={quant!r}: expected one of {', '.join(QUANT_KERNELS)}")
        path = self.bundle.file(graph["file"])
        is_ternary = "TernaryMatMul" in self.bundle.manifest.get("custom_ops", [])
        # --quantize int8 / int4, or a quantized LM head
        is_quant = "QuantMatMul" in self.bundle.manifest.get("custom_ops", [])
        attention_library = self._attention_library(attention, providers)
        import onnx

        from edgecpm.runtimes import onnxruntime_ops

        model = onnx.load(str(path), load_external_data=False)
        head = _tied_head_in_place(model)
        if head:
            # onnxruntime warns at every load that such an input "will not be treated as constant":
            # that is the point. Errors are still logged.
            opts.log_severity_level = 3
        ternary_kernel = attention_kernel = quant_kernel = head_kernel = None
        if is_ternary:
            ternary_kernel = self._rewrite_ternary(model, path, ternary, opts)
        # The library also holds a TernaryMatMul kernel: registered, it would run ternary nodes left to
        # their reference function, so in that check mode the rest is left as exported too.
        library_loaded = ternary_kernel is not None and ternary_kernel.startswith("edgecpm")
        reference = is_ternary and ternary == "reference"
        if is_quant:
            quant_kernel = self._rewrite_quant(model, quant, providers, library_loaded, reference, opts)
            library_loaded = library_loaded or quant_kernel.startswith("edgecpm")
        if attention_library is not None and not reference:
            from edgecpm.runtimes.attention_lowering import fuse_attention

            if fuse_attention(model, self.config.head_dim):
                if not library_loaded:
                    opts.register_custom_ops_library(str(attention_library))
                    library_loaded = True
                attention_kernel = f"edgecpm ({onnxruntime_ops.isa(attention_library)})"
            elif attention == "edgecpm":
                raise BackendUnavailable(f"{path}: no dense attention subgraph edgecpm's kernel can replace")
        head_library = self._fp32_library(providers) if head and attention != "reference" and not reference else None
        if head_library is not None and _head_to_kernel(model, head):
            if not library_loaded:
                opts.register_custom_ops_library(str(head_library))
            head_kernel = f"edgecpm ({onnxruntime_ops.isa(head_library)})"
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        return model.SerializeToString(), ternary_kernel, attention_kernel, quant_kernel, head_kernel

    def _rewrite_quant(self, model, quant: str, providers: list[str], loaded: bool, reference: bool, opts) -> str:
        """Leave the QuantMatMul nodes to edgecpm's kernel (registering its library unless `loaded`)
        or rewrite them to MatMulNBits over the same bytes; returns what runs them. "auto" leaves the
        library out where ternary nodes run on their reference function (`reference`)."""
        from edgecpm.runtimes import onnxruntime_ops
        from edgecpm.runtimes.quant_lowering import lower_quant

        dtype = self.bundle.manifest.get("dtype", "fp32")
        library = None
        if quant == "edgecpm":
            if dtype != "fp32":
                raise BackendUnavailable(f"edgecpm's QuantMatMul kernel computes in fp32; {self.bundle.path} is "
                                         f"{dtype}")
            library = onnxruntime_ops.library()
        elif quant == "auto" and not reference:
            library = self._fp32_library(providers)  # else MatMulNBits, which has vector code for more CPUs
        if library is not None:
            if not loaded:
                opts.register_custom_ops_library(str(library))
            return f"edgecpm ({onnxruntime_ops.isa(library)})"
        if quant == "matmulnbits-int8act":
            lower_quant(model, accuracy_level=4)
            return "MatMulNBits (int8 activations)"
        lower_quant(model)
        if providers[:1] == ["CPUExecutionProvider"] and platform.machine() == "x86_64" and any(
                n.op_type == "MatMulNBits" and a.i == 8
                for n in model.graph.node for a in n.attribute if a.name == "bits"):
            # stacklevel: the application's Session(...) line
            warnings.warn("onnxruntime's 8-bit MatMulNBits with fp32 activations is ~40x slower than edgecpm's "
                          "kernel on x86 (an int8 LM head: ~350 ms a token): build the kernel "
                          "(ONNXRUNTIME_INCLUDE_DIR) or export with --lm-head int4 / --quantize int4", stacklevel=6)
        return "MatMulNBits (fp32 activations)"

    def _attention_library(self, attention: str, providers: list[str]) -> Path | None:
        """The kernel library where edgecpm's fused attention is to run, else None."""
        from edgecpm.runtimes import onnxruntime_ops

        if attention == "reference":
            return None
        if attention == "edgecpm":
            dtype = self.bundle.manifest.get("dtype", "fp32")
            if dtype != "fp32" or self.config.sparse is not None:
                raise BackendUnavailable(f"edgecpm's attention kernel runs dense fp32 graphs; {self.bundle.path} is "
                                         f"{dtype}{' with sparse attention' if self.config.sparse else ''}")
            return onnxruntime_ops.library()
        return None if self.config.sparse is not None else self._fp32_library(providers)

    def _fp32_library(self, providers: list[str]) -> Path | None:
        """The kernel library where edgecpm's fp32 kernels run by default (fused attention, a tied
        head): an fp32 bundle on onnxruntime's CPU provider on x86-64, with a library that builds and
        has a vector path for this CPU; else None (the graph's own ops run)."""
        from edgecpm.runtimes import onnxruntime_ops

        if (self.bundle.manifest.get("dtype", "fp32") != "fp32" or platform.machine() != "x86_64"
                or providers[:1] != ["CPUExecutionProvider"]):
            return None
        try:
            library = onnxruntime_ops.library()
        except BackendUnavailable:
            return None  # the graph's own ops run (the ternary path warns about the library)
        return library if onnxruntime_ops.isa(library) != "scalar" else None

    def _rewrite_ternary(self, model, path: Path, ternary: str, opts) -> str:
        """Rewrite the TernaryMatMul nodes for what runs them; returns its name."""
        from edgecpm.runtimes import onnxruntime_ops
        from edgecpm.runtimes.ternary_lowering import fuse_ternary, lower_ternary
        from edgecpm.ternary_format import ACTIVATION_DIGITS

        if ternary == "reference":
            return "reference function"
        activations = (self.bundle.manifest.get("ternary") or {}).get("activations", "exact")
        library = self._edgecpm_library(ternary, activations)
        if library is not None:
            opts.register_custom_ops_library(str(library))
            fuse_ternary(model, path.parent)
            return f"edgecpm ({onnxruntime_ops.isa(library)})"
        digits = ACTIVATION_DIGITS[activations]
        lower_ternary(model, path.parent, digits)
        return f"MatMulNBits ({digits} int8 digits)"

    def _edgecpm_library(self, ternary: str, activations: str) -> Path | None:
        """The path of edgecpm's kernel library (runtimes/onnxruntime_ops.py) where it is to run the
        ternary linears, else None: they run on MatMulNBits."""
        from edgecpm.runtimes import onnxruntime_ops

        dtype = self.bundle.manifest.get("dtype", "fp32")
        if ternary == "edgecpm":
            if dtype != "fp32":
                raise BackendUnavailable(f"edgecpm's ternary kernel computes in fp32; {self.bundle.path} is {dtype}")
            return onnxruntime_ops.library()
        # Its vector paths are x86-64's (AVX-512, AVX2); elsewhere onnxruntime's kernel is the faster one.
        if ternary != "auto" or activations != "exact" or dtype != "fp32" or platform.machine() != "x86_64":
            return None
        try:
            library = onnxruntime_ops.library()
        except BackendUnavailable as e:
            # stacklevel: the application's Session(...) line
            warnings.warn(f"{e}. Ternary linears run on onnxruntime's MatMulNBits instead (exact, slower).",
                          stacklevel=6)
            return None
        return library if onnxruntime_ops.isa(library) != "scalar" else None

    def _check_io(self, graph: dict) -> None:
        want = {d["name"]: d["dtype"] for d in graph["inputs"] + graph["outputs"]}
        have = {a.name: _ORT_TYPE.get(a.type, a.type) for a in self.session.get_inputs() + self.session.get_outputs()}
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))
            raise BundleError(f"{self.bundle.path / graph['file']}: graph inputs/outputs do not match the manifest "
                              f"({diff[:6]}); re-export the bundle")

    def forward(self, input_ids, position_ids, attn_mask, cache: KVCache, logit_index, hidden_in=None):
        """hidden_in [T, H] float32: an EAGLE head's input features (its graph's `hidden_in`)."""
        b = self.binding
        T, N = len(input_ids), len(logit_index)
        b.bind_cpu_input("input_ids", input_ids.reshape(1, T))
        b.bind_cpu_input("position_ids", position_ids.reshape(1, T))
        b.bind_cpu_input("attn_mask", np.ascontiguousarray(attn_mask))
        b.bind_cpu_input("logit_index", logit_index)
        et = self.kv_dtype.type
        for i in self._layers:
            pk, pv = cache.past(i)
            nk, nv = cache.slot(i, T)
            b.bind_input(f"past_key.{i}", "cpu", 0, et, pk.shape, pk.ctypes.data)
            b.bind_input(f"past_value.{i}", "cpu", 0, et, pv.shape, pv.ctypes.data)
            b.bind_output(f"key.{i}", "cpu", 0, et, nk.shape, nk.ctypes.data)
            b.bind_output(f"value.{i}", "cpu", 0, et, nv.shape, nv.ctypes.data)
            if self.sparse:
                pc, nc = cache.past_ck(i), cache.ck_slot(i, T)
                b.bind_input(f"past_ckey.{i}", "cpu", 0, np.float32, pc.shape, pc.ctypes.data)
                b.bind_output(f"ckey.{i}", "cpu", 0, np.float32, nc.shape, nc.ctypes.data)
        logits = np.empty((N, self.n_logits), np.float32)
        b.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        if hidden_in is not None:
            b.bind_cpu_input("hidden_in", np.ascontiguousarray(hidden_in, dtype=np.float32))
        if self.has_hidden:
            self.last_hidden = np.empty((T, self.config.hidden_size), np.float32)
            b.bind_output("hidden", "cpu", 0, np.float32, self.last_hidden.shape, self.last_hidden.ctypes.data)
        self.session.run_with_iobinding(b)
        return logits
