"""`edgecpm build` for int8 / int4 bundles: the QuantMatMul linears and the quantized embedding
rewritten into what TensorRT runs natively for weight-only quantization (no plugin).

A QuantMatMul (export/quant_ops.py: W[n, k] = s[n, k/block] * (q[n, k] - z[n, k/block]), codes
unsigned with a zero point) becomes

    y = x @ DequantizeLinear(Wq [K, N], s^T [K/block, N], axis=0, block_size=block)   (opset 21)
        + blocksum(x) @ C,        C [K/block, N] = s * (2^(bits-1) - z),  left out where every C is 0

Wq holds the codes as *signed* INT4 / INT8, q - 2^(bits-1) (the byte XOR 0x88 / 0x80), because
TensorRT's Dequantize takes symmetric quantization only (a zero point must be all zeros); the
second term puts the zero points back exactly, and vanishes for a symmetric checkpoint (GPTQ sym:
z = 8 everywhere). Wq is stored [K, N], the right operand of MatMul, with the blocks along K
(axis 0), the layout TensorRT Model Optimizer's INT4 ONNX export gives TensorRT. An int8 linear
with one scale per row (the int8 default) becomes a per-channel Dequantize (scales [N], axis 1);
int8 with several groups per row stays blocked (TensorRT documents INT8 block quantization only in
its recent releases: a note is returned).

The quantized embedding (a Gather of code rows dequantized with BitShift, which TensorRT's parser
does not take, onto uint8, which it does not take either) becomes a Gather of the rows of
DequantizeLinear(Wq [V, H], s [V, H/block], axis=1) plus the gathered rows of C. A tied matrix
is stored twice, as rows for the embedding and as [H, V] for the head, both quantized.

The default domain's opset is raised to 21 (DequantizeLinear with block_size and INT4 need it;
raise_opset checks that every other node keeps its meaning) and the IR version to 10.

The weights are read once, rewritten (signed, transposed, packed) and written as new external data
through a TensorSink; the engine keeps them at 4 / 8 bits plus the scales (and C where needed).
Checked on the host with onnxruntime (tests/test_tensorrt_quant.py); not executed on TensorRT here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecpm.errors import BundleError
from edgecpm.export.quantize import pack_nibbles, unpack_layout

OPSET = 21
IR_VERSION = 10
TRT_INT4_BLOCKS = (64, 128)  # TensorRT's documented INT4 block sizes
DOMAIN, OP_TYPE = "edgecpm", "QuantMatMul"

# Default-domain ops whose newer versions (up to 21) only added types or attributes whose defaults
# keep the old behaviour, for the nodes an edgecpm graph holds. Anything else that changed between a
# graph's opset and 21 is converted (the Reduce* axes) or refused by raise_opset.
_SAME_MEANING = {
    "Cast",  # 19: saturate (float8 targets only, checked below); 21: int4 types
    "CastLike", "Constant", "ConstantOfShape", "Identity", "Reshape", "Shape", "Size", "Squeeze", "Unsqueeze",
    "Transpose", "Flatten", "Equal", "Where", "Expand", "Gather", "Concat", "Slice", "Tile",  # types only
    "ScatterND", "ScatterElements",  # 18: reduction max / min added (default "none" unchanged)
    "Pad",  # 18: optional axes input; 19: "wrap" mode added
    "DequantizeLinear", "QuantizeLinear",  # 19 / 21: types, block_size (default 0: the old per-axis form)
}
_AXES_TO_INPUT = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                  "ReduceLogSumExp", "ReduceSumSquare"}  # 18: `axes` moved from attribute to input
_FLOAT8 = {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
           if hasattr(TensorProto, n)}


class TensorSink:
    """Writes new initializers' bytes to `folder / data_file` (external data, appended), or keeps
    them in the model when data_file is None."""

    def __init__(self, folder: Path | None = None, data_file: str | None = None):
        self.folder, self.data_file = folder, data_file
        self.offset = 0
        if data_file is not None:
            (Path(folder) / data_file).write_bytes(b"")

    INLINE = 1024  # smaller tensors (shapes, axes) stay in the model: shape inference reads them

    def __call__(self, name: str, data_type: int, dims, raw) -> TensorProto:
        """raw: bytes, or an iterable of byte pieces (written one at a time)."""
        t = TensorProto(name=name, data_type=data_type, dims=list(dims))
        if isinstance(raw, bytes) and (self.data_file is None or len(raw) < self.INLINE):
            t.raw_data = raw
            return t
        pieces = [raw] if isinstance(raw, bytes) else raw
        if self.data_file is None:
            t.raw_data = b"".join(pieces)
            return t
        pad = -self.offset % 64
        length = 0
        with open(Path(self.folder) / self.data_file, "ab") as f:
            f.write(b"\0" * pad)
            for piece in pieces:
                f.write(piece)
                length += len(piece)
        self.offset += pad
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_file), ("offset", str(self.offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        self.offset += length
        return t


# ---- the weights ---------------------------------------------------------------------------------------
def signed_bytes(q: np.ndarray, bits: int) -> bytes:
    """Codes q (unsigned, any 2-D shape) as ONNX INT4 / INT8 raw data of q - 2^(bits-1), row-major;
    INT4 packs two a byte, the first element in the low nibble."""
    mid = 1 << (bits - 1)
    flat = np.ascontiguousarray(q, np.uint8).reshape(-1) ^ np.uint8(mid)  # two's complement of q - mid
    if bits == 8:
        return flat.tobytes()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return pack_nibbles(flat).tobytes()


_CHUNK = 1 << 24  # codes transposed at a time: the host memory of a build stays ~ one matrix's codes


def signed_bytes_transposed(q: np.ndarray, bits: int):
    """signed_bytes(q.T) in pieces of whole rows of q.T (an even row length keeps INT4 pairs whole)."""
    n, k = q.shape
    if bits == 4 and n % 2:
        raise BundleError(f"a quantized matrix with {n} outputs: TensorRT's INT4 needs an even last dimension")
    step = max(1, _CHUNK // max(n, 1))
    for k0 in range(0, k, step):
        yield signed_bytes(q[:, k0:k0 + step].T, bits)


def _value(tensor: TensorProto, base_dir) -> np.ndarray:
    return numpy_helper.to_array(tensor, base_dir=str(base_dir) if base_dir is not None else "")


# ---- the rewrite ---------------------------------------------------------------------------------------
class _Rewrite:
    def __init__(self, model: onnx.ModelProto, base_dir, sink: TensorSink):
        self.model, self.base_dir, self.sink = model, base_dir, sink
        self.inits = {t.name: t for t in model.graph.initializer}
        self.new_inits: list[TensorProto] = []
        self.loaded: dict[tuple, list] = {}
        self.uses: dict[str, int] = {}  # codes initializer -> how many rewrites read it
        self.counts = {"int4": 0, "int8": 0, "int8_per_channel": 0, "zero_point_terms": 0}
        self.notes: dict[str, list[str]] = {}  # a note on TensorRT's documented limits -> what it concerns
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"edgecpm_trt_q{self._n}_{base}"

    def const(self, array: np.ndarray, base: str) -> str:
        name = self.name(base)
        t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.new_inits.append(self.sink(name, t.data_type, t.dims, t.raw_data))
        return name

    def node(self, out: list, op: str, *inputs: str, **attrs) -> str:
        y = self.name(op.lower())
        out.append(helper.make_node(op, list(inputs), [y], name=y, **attrs))
        return y

    def init(self, name: str, what: str) -> TensorProto:
        t = self.inits.get(name)
        if t is None:
            raise BundleError(f"{what} {name!r} is not an initializer; re-export the bundle")
        return t

    def matrix(self, codes: str, scales: str, zeros: str, bits: int, block: int):
        """q [N, K], z [N, nb], s [N, nb] (its numpy dtype) of one stored matrix; read once and kept
        only while another user (a tied embedding / head) still needs it."""
        key = (codes, scales, zeros)
        if key not in self.loaded:
            s = _value(self.init(scales, "quantized scales"), self.base_dir)
            c = _value(self.init(codes, "quantized codes"), self.base_dir)
            zt = _value(self.init(zeros, "quantized zero points"), self.base_dir)
            n = c.shape[0]
            s = s.reshape(n, -1).copy()
            q, z = unpack_layout(c, zt.reshape(n, -1), bits, s.shape[1])
            del c
            nb = s.shape[1]
            if q.shape[1] != nb * block:
                raise BundleError(f"{codes}: {q.shape[1]} inputs do not make {nb} blocks of {block}")
            if (s < 0).any():
                raise BundleError(f"{scales}: negative scales; TensorRT's Dequantize takes positive scales only")
            empty = s == 0  # an all-zero block (fp16 scales that underflowed): TensorRT wants scales > 0,
            if empty.any():  # so the same zeros as s = 1, q = z = 2^(bits-1)
                mid = 1 << (bits - 1)
                q = q if q.flags.writeable else q.copy()
                s[empty] = 1
                z = z.copy()
                z[empty] = mid
                q.reshape(n, nb, block)[empty] = mid
            self.loaded[key] = [q, z, s, 0]
        entry = self.loaded[key]
        entry[3] += 1
        if entry[3] >= self.uses.get(codes, 1):
            del self.loaded[key]
        return entry[0], entry[1], entry[2]

    def dq_layout(self, q, z, s, bits, block, what):
        """(per_channel, offset C [N, nb] float32 or None) for a matrix; notes TensorRT's limits."""
        per_channel = bits == 8 and bool((s == s[:, :1]).all() and (z == z[:, :1]).all())
        mid = 1 << (bits - 1)
        c = s.astype(np.float32) * (mid - z.astype(np.float32))
        if bits == 4 and block not in TRT_INT4_BLOCKS:
            self.note(f"INT4 blocks of {block} inputs: TensorRT documents blocks of "
                      f"{' and '.join(map(str, TRT_INT4_BLOCKS))} only (re-export with --group-size 64 or 128)", what)
        if bits == 8 and not per_channel:
            self.note("INT8 with several scales a row: needs TensorRT's INT8 block quantization (documented in "
                      "recent releases only; older ones take one INT8 scale a row: export with --lm-head int4, "
                      "--quantize int8 --group-size -1 or int4 for those)", what)
        return per_channel, (c if c.any() else None)

    def note(self, text: str, what: str) -> None:
        self.notes.setdefault(text, []).append(what)

    # -- a QuantMatMul node -> DQ + MatMul (+ zero-point term) --
    def linear(self, node) -> list:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, block, k = int(attrs["bits"]), int(attrs["block_size"]), int(attrs["in_features"])
        x, codes, scales, zeros = node.input[:4]
        q, z, s = self.matrix(codes, scales, zeros, bits, block)
        if q.shape[1] != k:
            raise BundleError(f"QuantMatMul {node.name}: codes hold {q.shape[1]} inputs, in_features is {k}")
        per_channel, c = self.dq_layout(q, z, s, bits, block, node.name)
        dtype = TensorProto.INT4 if bits == 4 else TensorProto.INT8
        base = codes.removesuffix(".codes")
        wq = self.name(base + ".kn")
        self.new_inits.append(self.sink(wq, dtype, [k, q.shape[0]], signed_bytes_transposed(q, bits)))
        out: list = []
        if per_channel:
            sk = self.const(s[:, 0], base + ".scale")
            w = self.node(out, "DequantizeLinear", wq, sk, axis=1)
        else:
            sk = self.const(s.T, base + ".scales_kn")
            w = self.node(out, "DequantizeLinear", wq, sk, axis=0, block_size=block)
        y = self.node(out, "MatMul", x, w)
        if c is not None:
            nb = s.shape[1]
            if per_channel:
                xs = self.node(out, "ReduceSum", x, self.const(np.array([1], np.int64), "axes"), keepdims=1)
                term = self.node(out, "Mul", xs, self.const(c[:, 0].astype(s.dtype), base + ".zero_term"))
            else:
                blocks = self.node(out, "Reshape", x, self.const(np.array([0, nb, block], np.int64), "shape"))
                xs = self.node(out, "ReduceSum", blocks, self.const(np.array([2], np.int64), "axes"), keepdims=0)
                term = self.node(out, "MatMul", xs, self.const(c.T.astype(s.dtype), base + ".zero_term"))
            y = self.node(out, "Add", y, term)
            self.counts["zero_point_terms"] += 1
        out[-1].output[0] = node.output[0]
        self.counts["int8_per_channel" if per_channel else f"int{bits}"] += 1
        return out

    # -- the embedding: Gather of code rows + BitShift dequantization -> Gather of DQ rows --
    def embedding(self, gathers: dict, consumers: dict, producers: dict) -> tuple[list, str, str]:
        """gathers: {"codes"|"scales"|"zeros": (gather node, initializer name)} of one matrix.
        Returns (new nodes, the rows tensor they replace, the new rows tensor)."""
        g_codes = gathers["codes"][0]
        ids = g_codes.input[1]
        # the dequantized rows (dequantize_rows in quant_ops.py): the Reshape [n, H] of the first Mul
        # that depends on all three gathers, (q - z) * s
        deps: dict[str, set] = {}
        for part, (g, _) in gathers.items():
            deps[g.output[0]] = {part}
        end = None
        for n in self.model.graph.node:
            d = set().union(*(deps.get(i, set()) for i in n.input))
            if not d:
                continue
            for o in n.output:
                deps[o] = d
            users = consumers.get(n.output[0], [])
            if len(d) == 3 and n.op_type == "Mul" and len(users) == 1 and users[0].op_type == "Reshape":
                end = users[0]
                break
        if end is None:
            raise BundleError("the quantized embedding does not have the exporter's form (Gather of code rows, "
                              "dequantized, reshaped); re-export the bundle")
        rows = end.output[0]
        codes, scales, zeros = (gathers[p][1] for p in ("codes", "scales", "zeros"))
        n, nb, blob = self.init(codes, "quantized codes").dims
        hidden = self._hidden(end, producers)
        bits = 8 * blob * nb // hidden
        if bits not in (4, 8) or bits * hidden != 8 * blob * nb:
            raise BundleError(f"{codes}: {nb} x {blob} bytes a row do not hold {hidden} codes of 4 or 8 bits")
        block = hidden // nb
        q, z, s = self.matrix(codes, scales, zeros, bits, block)
        per_channel, c = self.dq_layout(q, z, s, bits, block, "the embedding")
        dtype = TensorProto.INT4 if bits == 4 else TensorProto.INT8
        base = codes.removesuffix(".codes")
        wq = self.name(base + ".rows")
        self.new_inits.append(self.sink(wq, dtype, [n, hidden], signed_bytes(q, bits)))
        out: list = []
        if per_channel:
            w = self.node(out, "DequantizeLinear", wq, self.const(s[:, 0], base + ".scale"), axis=0)
        else:
            w = self.node(out, "DequantizeLinear", wq, self.const(s, base + ".scales"), axis=1, block_size=block)
        e = self.node(out, "Gather", w, ids, axis=0)
        if c is not None:
            if per_channel:
                term = self.node(out, "Gather", self.const(c[:, :1].astype(s.dtype), base + ".zero_term"), ids,
                                 axis=0)  # [T, 1]
                e = self.node(out, "Add", e, term)
            else:
                term = self.node(out, "Gather", self.const(c.astype(s.dtype), base + ".zero_term"), ids, axis=0)
                term = self.node(out, "Unsqueeze", term, self.const(np.array([2], np.int64), "axes"))
                e3 = self.node(out, "Reshape", e, self.const(np.array([0, nb, block], np.int64), "shape"))
                e = self.node(out, "Reshape", self.node(out, "Add", e3, term),
                              self.const(np.array([0, hidden], np.int64), "shape"))
            self.counts["zero_point_terms"] += 1
        if s.dtype != np.float32:  # the rows the graph dequantized were float32 (then cast)
            e = self.node(out, "Cast", e, to=TensorProto.FLOAT)
        return out, rows, e

    def _hidden(self, reshape, producers) -> int:
        """The row length of the dequantized rows: the constant in their Reshape's Concat(n, k) shape."""
        concat = producers.get(reshape.input[1])
        k = self.inits.get(concat.input[-1]) if concat is not None and concat.op_type == "Concat" else None
        if k is None:
            raise BundleError("the quantized embedding's row length is not a constant; re-export the bundle")
        return int(_value(k, self.base_dir).reshape(-1)[0])


def _embedding_gathers(model, inits: dict) -> dict:
    """{codes initializer: {"codes"|"scales"|"zeros": (Gather node, initializer)}} of the quantized
    embeddings: Gathers of a `<base>.codes` uint8 initializer [V, nb, blob] and of `<base>.scales` /
    `<base>.zeros` (directly or through a Reshape)."""
    reshaped = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Reshape"}
    found: dict[str, dict] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.input[0]
        src = src if src in inits else reshaped.get(src, src)
        for part in ("codes", "scales", "zeros"):
            if src.endswith("." + part) and src in inits:
                base = src[: -len(part) - 1]
                if all(f"{base}.{p}" in inits for p in ("codes", "scales", "zeros")) \
                        and inits[f"{base}.codes"].data_type == TensorProto.UINT8:
                    found.setdefault(f"{base}.codes", {})[part] = (node, src)
    return {k: v for k, v in found.items() if len(v) == 3}


def lower_quant_for_tensorrt(model: onnx.ModelProto, base_dir=None, sink: TensorSink | None = None) -> dict:
    """Rewrite, in place, every QuantMatMul node and quantized embedding of `model` (loaded with or
    without its external data, which is read from base_dir) for TensorRT (module docstring); drop
    the nodes and initializers nothing reads any more, raise the opset. Returns what was done:
    counts, the notes on TensorRT's documented limits (also warned), and {} if there was nothing."""
    sink = sink or TensorSink()
    inits = {t.name: t for t in model.graph.initializer}
    quant = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    embeds = _embedding_gathers(model, inits)
    if not quant and not embeds:
        return {}
    rw = _Rewrite(model, base_dir, sink)
    for name in [n.input[1] for n in quant] + list(embeds):
        rw.uses[name] = rw.uses.get(name, 0) + 1
    consumers: dict[str, list] = {}
    producers: dict[str, object] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producers[o] = n
    before: dict[int, list] = {}  # id(node) -> new nodes placed before it
    replaced: set[int] = set()
    renamed: dict[str, str] = {}
    for gathers in embeds.values():
        new, rows, e = rw.embedding(gathers, consumers, producers)
        before.setdefault(id(gathers["codes"][0]), []).extend(new)
        renamed[rows] = e
    for node in quant:
        before.setdefault(id(node), []).extend(rw.linear(node))
        replaced.add(id(node))
    nodes = []
    for node in model.graph.node:
        nodes.extend(before.get(id(node), []))
        if id(node) in replaced:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for j, i in enumerate(copy.input):
            if i in renamed:
                copy.input[j] = renamed[i]
        nodes.append(copy)
    graph = model.graph
    for o in graph.output:
        if o.name in renamed:
            raise BundleError(f"graph output {o.name} is the quantized embedding's rows; re-export the bundle")
    del graph.node[:]
    graph.node.extend(_live(nodes, {o.name for o in graph.output}))
    graph.initializer.extend(rw.new_inits)
    produced = {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    dropped = len(graph.initializer) - len(kept)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(n.op_type == OP_TYPE and n.domain == DOMAIN for n in graph.node):
        functions = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
        del model.functions[:]
        model.functions.extend(functions)
    raise_opset(model, OPSET)
    model.ir_version = max(model.ir_version, IR_VERSION)
    notes = [f"{text} ({len(what)} matri{'x' if len(what) == 1 else 'ces'}: {', '.join(what[:3])}"
             f"{', ...' if len(what) > 3 else ''})" for text, what in rw.notes.items()]
    for note in notes:
        warnings.warn(f"edgecpm build: {note}", stacklevel=2)
    return {**rw.counts, "embeddings": len(embeds), "initializers_dropped": dropped, "notes": notes,
            "opset": OPSET}


def _live(nodes: list, outputs: set) -> list:
    """The nodes that graph outputs depend on, in their order."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    need, live = list(outputs), set()
    while need:
        i = producer.get(need.pop())
        if i is None or i in live:
            continue
        live.add(i)
        need.extend(nodes[i].input)
    return [n for i, n in enumerate(nodes) if i in live]


# ---- the opset ----------------------------------------------------------------------------------------
def raise_opset(model: onnx.ModelProto, target: int = OPSET) -> list[str]:
    """Raise the default domain's opset of `model` to `target`, keeping every node's meaning: ops
    whose version did not change, or changed only in types / defaulted attributes (_SAME_MEANING),
    are left as they are; Reduce* ops get their `axes` attribute as an input (opset 18); any other
    change is refused with the op's name. Returns the ops that were converted."""
    from onnx import defs

    entry = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if entry is None:
        model.opset_import.append(helper.make_opsetid("", target))
        return []
    old = entry.version
    if old >= target:
        return []
    converted, refused = [], set()
    extra: list[TensorProto] = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            refused.add(f"{node.op_type} (subgraph)")
            continue
        was = defs.get_schema(node.op_type, old).since_version
        now = defs.get_schema(node.op_type, target).since_version
        if was == now:
            continue
        if node.op_type in _AXES_TO_INPUT and was < 18 <= now:
            axes = next((a for a in node.attribute if a.name == "axes"), None)
            if axes is not None:
                name = f"{node.name or node.output[0]}.axes"
                extra.append(numpy_helper.from_array(np.array(list(axes.ints), np.int64), name))
                node.attribute.remove(axes)
                node.input.append(name)
            converted.append(node.op_type)
        elif node.op_type == "Cast" and any(a.name == "to" and a.i in _FLOAT8 for a in node.attribute):
            refused.add("Cast to float8")
        elif node.op_type == "Split" and was < 18 <= now and len(node.input) < 2:
            node.attribute.append(helper.make_attribute("num_outputs", len(node.output)))
            converted.append("Split")
        elif node.op_type == "Split" and was < 18 <= now:
            pass  # explicit split sizes: unchanged
        elif node.op_type not in _SAME_MEANING:
            refused.add(node.op_type)
    if refused:
        raise BundleError(f"cannot raise the graph's opset from {old} to {target} for TensorRT's block-quantized "
                          f"weights: {', '.join(sorted(refused))} changed meaning in between")
    model.graph.initializer.extend(extra)
    entry.version = target
    return sorted(set(converted))


