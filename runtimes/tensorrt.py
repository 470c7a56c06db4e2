"""The TensorRT backend: runs the engine `edgecpm build` made for this device (DESIGN.md §6, §11).

The KV cache lives on the GPU, in one device arena with the layout of edgecpm.kv_cache.KVCache
(per layer K and V [rows, Hkv, D], token-major; InfLLM v2 compressed keys [n_chunks(rows), Hkv, D]
fp32), allocated once for the session's capacity. Each step binds `past_key.{i}` to the first P
rows of layer i (the pointer never moves, only the shape) and the `key.{i}`/`value.{i}`/`ckey.{i}`
outputs to the rows right after them, so the new keys land where the next step reads them and
nothing is copied. The host arena of KVCache is left untouched (its pages are never mapped).
Inputs go through one pinned staging buffer (one host-to-device copy per step), logits come back
through pinned memory; everything runs on one stream; nothing is allocated per step. The profile
(prefill or decode/verify) is chosen by the step's size. An engine built for another GPU or
TensorRT version is refused with the reason.

Not executable on the machines this was written on (no GPU, no TensorRT): see plugins/README.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from pathlib import Path

import numpy as np

from edgecpm import dtypes
from edgecpm.bundle import Bundle
from edgecpm.errors import BackendUnavailable, BundleError, ConfigError
from edgecpm.kv_cache import KVCache
from edgecpm.runtimes import tensorrt_engines as te  # engine checks, plugins, profiles; no TensorRT import


class _Config(ctypes.Structure):  # ecpm_infllmv2_config (plugins/include/edgecpm_kernels.h)
    _fields_ = [(n, ctypes.c_int32) for n in ("kernel_size", "kernel_stride", "block_size", "init_blocks",
                                              "window_size", "topk", "dense_len", "semantics")]


class _Dims(ctypes.Structure):  # ecpm_attn_dims
    _fields_ = [("T", ctypes.c_int64), ("P", ctypes.c_int64), ("Hq", ctypes.c_int32), ("Hkv", ctypes.c_int32),
                ("D", ctypes.c_int32)]


def compaction_copies(start: int, rows) -> list[tuple[int, int, int]]:
    """KVCache.keep on a device arena as row copies: (src, dst, n) moves rows [src, src+n) to
    [dst, dst+n), in order. Consecutive kept rows move together; a run that would overlap its own
    destination is cut into pieces no longer than its shift, so no copy reads rows an earlier one
    overwrote (rows only move down)."""
    rows = [int(r) for r in rows]
    copies = []
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        src, dst, n = rows[i], start + i, j - i + 1
        shift = src - dst
        if shift > 0:
            step = min(n, shift)
            for k in range(0, n, step):
                copies.append((src + k, dst + k, min(step, n - k)))
        i = j + 1
    return copies


def plan_pieces(T: int, logit_index, max_tokens: int, max_rows: int) -> list[tuple[int, int]]:
    """[start, end) pieces of a causal step: at most max_tokens tokens and max_rows requested logit
    rows each (a piece of max_rows tokens never holds more), in order."""
    rows = np.asarray(logit_index)
    pieces, s = [], 0
    while s < T:
        e = min(s + max_tokens, T)
        if int(((rows >= s) & (rows < e)).sum()) > max_rows:
            e = s + max_rows
        pieces.append((s, e))
        s = e
    return pieces


def is_causal(mask: np.ndarray) -> bool:
    T = mask.shape[0]
    return bool(np.array_equal(mask, np.tri(T, dtype=bool)))


def usable_engine(bundle: Bundle) -> tuple[dict | None, str]:
    """(engine record, "") when this bundle has an engine for this GPU and TensorRT, else (None, why).
    Never raises: for backend="auto", which prefers tensorrt when it can run."""
    try:
        trt = te.import_tensorrt("backend 'tensorrt'")
        gpu, cc = te.gpu_identity()
    except BackendUnavailable as e:
        return None, str(e)
    record, refused = te.find_engine(bundle.manifest, gpu, cc, str(trt.__version__))
    if record is None:
        return None, "; ".join(refused) or f"no engine built for {gpu}: run `edgecpm build {bundle.path}`"
    return record, ""


class _Cuda:
    """The few cuda-python runtime calls the backend makes, with errors raised."""

    def __init__(self, cudart):
        self.rt = cudart

    def __call__(self, name, *args):
        out = getattr(self.rt, name)(*args)
        err, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        if int(err) != 0:
            raise RuntimeError(f"CUDA {name} failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    def kind(self, name):
        return getattr(self.rt.cudaMemcpyKind, name)


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, bundle: Bundle, threads: int | None = None, plugin_lib=None, verify: bool = False):
        trt = te.import_tensorrt("backend 'tensorrt'")
        self.cuda = _Cuda(te.import_cudart("backend 'tensorrt'"))
        self.bundle, self.config = bundle, bundle.config
        self.max_prefill_chunk = None  # the engine's profiles bound a step (forward() splits longer ones)
        self.ternary_kernel = "tensorrt" if "TernaryMatMul" in bundle.manifest.get("custom_ops", []) else None
        manifest = bundle.manifest
        gpu, cc = te.gpu_identity()
        record, refused = te.find_engine(manifest, gpu, cc, str(trt.__version__))
        if record is None:
            why = ("; refused: " + "; ".join(refused)) if refused else ""
            raise BackendUnavailable(f"{bundle.path}: no TensorRT engine for {gpu} (compute capability {cc}) and "
                                     f"TensorRT {trt.__version__}{why}; build one on this device with "
                                     f"`edgecpm build {bundle.path}`")
        self.record = record
        engine_path = bundle.path / record["file"]
        self._check_engine_file(engine_path, record, verify)

        self.logger = trt.Logger(trt.Logger.WARNING)
        lib = te.require_plugin_library(manifest, plugin_lib, "backend 'tensorrt'")
        self.kernels = None
        if lib is not None:
            te.load_plugins(trt, lib)
            self.kernels = ctypes.CDLL(str(lib))  # the C ABI, for compaction of compressed keys
        self.runtime = trt.Runtime(self.logger)
        with open(engine_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BundleError(f"{engine_path}: TensorRT {trt.__version__} could not deserialize the engine (corrupted, "
                              f"or built with other plugins); rebuild it with `edgecpm build {bundle.path}`")
        self.context = self.engine.create_execution_context()
        self._check_io(trt)

        graph = bundle.graph("decoder")
        self.kv_dtype = dtypes.numpy_dtype(next(d["dtype"] for d in graph["inputs"] if d["name"] == "past_key.0"))
        self.weight_bytes = record["size"]  # the engine holds the weights
        cfg = self.config
        self.layers, self.hkv, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        self.sparse = cfg.sparse
        self.vocab = next(d["shape"][1] for d in graph["outputs"] if d["name"] == "logits")
        # Bundles exported before the `hidden` output still load; an EAGLE drafter needs it.
        self.has_hidden = any(d["name"] == "hidden" for d in graph["outputs"])
        self.last_hidden: np.ndarray | None = None  # [T, H] float32: the last step's `hidden` rows
        self.profiles = record["profiles"]
        self.max_t = max(p["dims"]["T"][2] for p in self.profiles)
        # Logit rows one step can return: a verify tree's worth (pinned + device buffers of rows x vocab
        # floats stay small on a Jetson); causal steps asking for more are run in pieces.
        self.logit_rows = min(p["dims"]["T"][2] for p in self.profiles)
        self.max_context = int(record["max_context"])
        self.active_profile = None
        self.stream = self.cuda("cudaStreamCreate")
        self._stream_int = int(self.stream)
        self._alloc_staging()
        self.arena = None  # device KV arena, allocated on the first step for the cache's capacity
        self._arena_rows = 0

    # ---- setup ---------------------------------------------------------------------------------
    @staticmethod
    def _check_engine_file(path: Path, record: dict, verify: bool) -> None:
        if not path.is_file():
            raise BundleError(f"{path}: engine listed in the manifest is missing; rebuild with `edgecpm build`")
        if path.stat().st_size != record["size"]:
            raise BundleError(f"{path}: {path.stat().st_size} bytes, manifest says {record['size']}; the engine is "
                              f"truncated or was replaced: rebuild it with `edgecpm build`")
        if verify:
            from edgecpm.bundle import sha256_file

            if sha256_file(path) != record["sha256"]:
                raise BundleError(f"{path}: sha256 mismatch with the manifest; rebuild it with `edgecpm build`")

    def _check_io(self, trt) -> None:
        graph = self.bundle.graph("decoder")
        want = {d["name"] for d in graph["inputs"] + graph["outputs"]}
        have = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if want != have:
            raise BundleError(f"{self.bundle.path / self.record['file']}: engine inputs/outputs do not match the "
                              f"manifest ({sorted(want ^ have)[:6]}); rebuild it with `edgecpm build`")

    def _alloc_staging(self) -> None:
        """Pinned host + device buffers for the step inputs (ids, positions, logit rows, mask) and logits."""
        t = self.max_t
        self._off = {"input_ids": 0, "position_ids": 8 * t, "logit_index": 16 * t, "attn_mask": 24 * t}
        self._in_bytes = 24 * t + t * t
        self._h_in = self.cuda("cudaMallocHost", self._in_bytes)
        self._d_in = self.cuda("cudaMalloc", self._in_bytes)
        self._h_in_view = np.ctypeslib.as_array((ctypes.c_uint8 * self._in_bytes).from_address(int(self._h_in)))
        rows = self.logit_rows
        self._h_logits = self.cuda("cudaMallocHost", 4 * rows * self.vocab)
        self._d_logits = self.cuda("cudaMalloc", 4 * rows * self.vocab)
        self._logits_view = np.ctypeslib.as_array(
            (ctypes.c_float * (rows * self.vocab)).from_address(int(self._h_logits))).reshape(rows, self.vocab)
        if self.has_hidden:  # every step's `hidden` rows come back too (T x H floats)
            h = self.config.hidden_size
            self._h_hidden = self.cuda("cudaMallocHost", 4 * t * h)
            self._d_hidden = self.cuda("cudaMalloc", 4 * t * h)
            self._hidden_view = np.ctypeslib.as_array(
                (ctypes.c_float * (t * h)).from_address(int(self._h_hidden))).reshape(t, h)

    def _ensure_arena(self, cache: KVCache) -> None:
        """One device allocation for the cache's capacity (capped at the engine's context)."""
        rows = min(cache.capacity, self.max_context)
        if self.arena is not None and rows == self._arena_rows:
            return
        self._free_arena()
        self._row = self.hkv * self.head_dim * self.kv_dtype.itemsize  # bytes per token per layer and K/V
        self._slab = rows * self._row  # one layer's K (or V)
        self.arena = self.cuda("cudaMalloc", 2 * self.layers * self._slab)
        self._ck_row = self.hkv * self.head_dim * 4
        self._ck_rows = self._n_chunks(rows)
        ck_bytes = max(self.layers * self._ck_rows * self._ck_row, 1)
        self.ck_arena = self.cuda("cudaMalloc", ck_bytes) if self.sparse else None
        self._arena_rows = rows
        # The past inputs never move: bind them once (only their shapes change per step).
        for i in range(self.layers):
            self.context.set_tensor_address(f"past_key.{i}", self._k(i, 0))
            self.context.set_tensor_address(f"past_value.{i}", self._v(i, 0))
            if self.sparse:
                self.context.set_tensor_address(f"past_ckey.{i}", self._ck(i, 0))
        for name, off in self._off.items():
            self.context.set_tensor_address(name, int(self._d_in) + off)
        self.context.set_tensor_address("logits", int(self._d_logits))
        if self.has_hidden:
            self.context.set_tensor_address("hidden", int(self._d_hidden))

    def _n_chunks(self, length: int) -> int:
        return self.sparse.n_chunks(length) if self.sparse else 0

    def _k(self, layer: int, row: int) -> int:
        return int(self.arena) + (2 * layer) * self._slab + row * self._row

    def _v(self, layer: int, row: int) -> int:
        return int(self.arena) + (2 * layer + 1) * self._slab + row * self._row

    def _ck(self, layer: int, chunk: int) -> int:
        chunk = min(chunk, max(self._ck_rows - 1, 0))  # an empty output still needs a valid address
        return int(self.ck_arena) + (layer * self._ck_rows + chunk) * self._ck_row

    # ---- the Backend protocol --------------------------------------------------------------------
    def forward(self, input_ids, position_ids, attn_mask, cache: KVCache, logit_index, hidden_in=None):
        """One decoder step. A plain causal step longer than the engine's largest profile, or asking
        for more logit rows than a step returns, runs in pieces (each sees the previous as past)."""
        if hidden_in is not None:
            raise ConfigError("the tensorrt backend runs decoders only, not an EAGLE head; run the head on onnxruntime")
        T, N = len(input_ids), len(logit_index)
        if self.max_t >= T and self.logit_rows >= N:
            return self._step(input_ids, position_ids, attn_mask, cache.length, cache, logit_index)
        if not is_causal(attn_mask):
            raise ConfigError(f"a draft tree of {T} tokens exceeds the engine's largest step ({self.logit_rows}); "
                              f"rebuild with a larger --max-verify")
        parts, hidden = [], []
        for s, e in plan_pieces(T, logit_index, self.max_t, self.logit_rows):
            rows = logit_index[(logit_index >= s) & (logit_index < e)] - s
            parts.append(self._step(input_ids[s:e], position_ids[s:e], attn_mask[s:e, s:e], cache.length + s, cache,
                                    rows.astype(np.int64)))
            hidden.append(self.last_hidden)
        if self.has_hidden:
            self.last_hidden = np.concatenate(hidden)
        return np.concatenate(parts)

    def _step(self, ids, positions, mask, P: int, cache: KVCache, logit_index) -> np.ndarray:
        T, N = len(ids), len(logit_index)
        if self.max_context < P + T:
            raise ConfigError(f"{P + T} tokens exceed the {self.max_context}-token context the engine was built for; "
                              f"rebuild with a larger --max-context or lower kv_budget")
        self._ensure_arena(cache)
        profile = te.select_profile(self.profiles, T, P)
        ctx = self.context
        if profile != self.active_profile:
            ctx.set_optimization_profile_async(profile, self._stream_int)
            self.active_profile = profile
        # Stage the inputs in pinned memory: one host-to-device copy.
        h = self._h_in_view
        h[self._off["input_ids"]:][: 8 * T].view(np.int64)[:] = ids
        h[self._off["position_ids"]:][: 8 * T].view(np.int64)[:] = positions
        h[self._off["logit_index"]:][: 8 * N].view(np.int64)[:] = logit_index
        h[self._off["attn_mask"]:][: T * T].view(np.bool_)[:] = np.asarray(mask, dtype=bool).ravel()
        used = self._off["attn_mask"] + T * T
        self.cuda("cudaMemcpyAsync", int(self._d_in), int(self._h_in), used, self.cuda.kind("cudaMemcpyHostToDevice"),
                  self.stream)
        ctx.set_input_shape("input_ids", (1, T))
        ctx.set_input_shape("position_ids", (1, T))
        ctx.set_input_shape("attn_mask", (T, T))
        ctx.set_input_shape("logit_index", (N,))
        c_past, c_new = self._n_chunks(P), self._n_chunks(P + T)
        for i in range(self.layers):
            ctx.set_input_shape(f"past_key.{i}", (P, self.hkv, self.head_dim))
            ctx.set_input_shape(f"past_value.{i}", (P, self.hkv, self.head_dim))
            ctx.set_tensor_address(f"key.{i}", self._k(i, P))
            ctx.set_tensor_address(f"value.{i}", self._v(i, P))
            if self.sparse:
                ctx.set_input_shape(f"past_ckey.{i}", (c_past, self.hkv, self.head_dim))
                ctx.set_tensor_address(f"ckey.{i}", self._ck(i, c_past if c_new > c_past else 0))
        if not ctx.execute_async_v3(self._stream_int):
            raise RuntimeError(f"TensorRT failed to run a step of {T} tokens after {P} (see its log above)")
        if N:
            self.cuda("cudaMemcpyAsync", int(self._h_logits), int(self._d_logits), 4 * N * self.vocab,
                      self.cuda.kind("cudaMemcpyDeviceToHost"), self.stream)
        if self.has_hidden:
            self.cuda("cudaMemcpyAsync", int(self._h_hidden), int(self._d_hidden), 4 * T * self.config.hidden_size,
                      self.cuda.kind("cudaMemcpyDeviceToHost"), self.stream)
        self.cuda("cudaStreamSynchronize", self.stream)
        if self.has_hidden:
            self.last_hidden = self._hidden_view[:T].copy()
        return self._logits_view[:N].copy()

    # ---- speculative decoding: keep the accepted rows ------------------------------------------------
    def on_keep(self, start: int, rows) -> None:
        """Mirror of KVCache.keep(start, rows) on the device arena (KVCache calls it): move the
        kept rows down in every layer's K and V (one 2-D copy per run of rows, all layers at once)
        and recompute the compressed keys the moved rows touch."""
        if self.arena is None:
            return
        d2d = self.cuda.kind("cudaMemcpyDeviceToDevice")
        for src, dst, n in compaction_copies(start, rows):
            # height = 2 * layers slabs, pitch = one slab: every layer's K and V in one call.
            self.cuda("cudaMemcpy2DAsync", self._k(0, dst), self._slab, self._k(0, src), self._slab, n * self._row,
                      2 * self.layers, d2d, self.stream)
        end = start + len(rows)
        if self.sparse and self._n_chunks(end) > self._n_chunks(start):
            self._recompress(start, end)
        self.cuda("cudaStreamSynchronize", self.stream)

    def _recompress(self, start: int, end: int) -> None:
        if self.kernels is None:
            raise BackendUnavailable("compressed-key recomputation needs the plugin library's kernels")
        sp = self.sparse
        cfg = _Config(sp.kernel_size, sp.kernel_stride, sp.block_size, sp.init_blocks, sp.window_size, sp.topk,
                      sp.dense_len, int(sp.semantics[1:]))
        dims = _Dims(end - start, start, self.config.num_attention_heads, self.hkv, self.head_dim)
        fn = self.kernels.ecpm_infllmv2_compress
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, _Dims, ctypes.POINTER(_Config),
                       ctypes.c_void_p, ctypes.c_void_p]
        dtype = 1 if self.kv_dtype == np.float16 else 0  # ecpm_dtype
        for i in range(self.layers):  # chunks [n_chunks(start), n_chunks(end)) from the compacted keys
            status = fn(dtype, self._k(i, 0), self._k(i, start), dims, ctypes.byref(cfg),
                        self._ck(i, self._n_chunks(start)), self._stream_int)
            if status != 0:
                raise RuntimeError(f"ecpm_infllmv2_compress failed with status {status}")

    # ---- teardown --------------------------------------------------------------------------------------
    def _free_arena(self) -> None:
        for name in ("arena", "ck_arena"):
            ptr = getattr(self, name, None)
            if ptr is not None:
                self.cuda.rt.cudaFree(ptr)
                setattr(self, name, None)

    def close(self) -> None:
        self._free_arena()
        for name, free in (("_d_in", "cudaFree"), ("_d_logits", "cudaFree"), ("_h_in", "cudaFreeHost"),
                           ("_h_logits", "cudaFreeHost"), ("_d_hidden", "cudaFree"), ("_h_hidden", "cudaFreeHost")):
            ptr = self.__dict__.pop(name, None)
            if ptr is not None:
                getattr(self.cuda.rt, free)(ptr)

    def __del__(self):
        # Best effort at interpreter exit, when cuda-python may already be gone.
        with contextlib.suppress(AttributeError, RuntimeError, TypeError):
            self.close()
