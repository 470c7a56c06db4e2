"""Building blocks for ONNX graphs and function bodies: a node builder and GQA attention.

Attention reads the token-major cache [P, Hkv, D] without copying or transposing it: viewed as
[P*Hkv, D] it is the left operand of one MatMul against all queries ([D, Hkv*G*T]). That scores
every kv head against every query group (Hkv times the needed multiply-adds — 2x for MiniCPM4's
two kv heads) and a Gather keeps the matching (kv head, group) pairs. Decoding is bound by reading
the cache, so reading it once beats the copy a Transpose/Einsum would make. Values work the same
way. Past and new score blocks share one softmax; their weighted sums are added (never a concat
of the cache). Everything is opset 17 and dtype-agnostic (CastLike), so the same code serves the
decoder graph and the custom ops' reference functions.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


class GraphBuilder:
    """Appends nodes with fresh output names. Inside a graph, constants and weights become
    initializers (weights through `weight_sink`); inside a function body (no sink) constants
    become Constant nodes, since functions cannot hold initializers."""

    def __init__(self, weight_sink=None, prefix: str = "", model_dtype: int | None = None):
        """model_dtype: the graph's activation dtype (TensorProto enum) when known, None inside
        dtype-agnostic function bodies."""
        self.model_dtype = model_dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.sink = weight_sink
        self.prefix = prefix
        self._n = 0
        self._consts: dict[tuple, str] = {}
        self._built: dict[tuple, str | list[str]] = {}
        self._shapes: dict[str, list[str]] = {}

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", **attrs):
        """A node; an identical node built before (same op, inputs and attributes) is reused, so
        shape arithmetic repeated by every layer exists once in the graph (ONNX ops are pure)."""
        key = _node_key(op_type, domain, inputs, n_out, attrs)
        if key is not None and key in self._built:
            return self._built[key]
        self._n += 1
        base = f"{self.prefix}{op_type.lower()}_{self._n}"
        outs = [base + (f"_{j}" if n_out > 1 else "") for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain, **attrs))
        result = outs[0] if n_out == 1 else outs
        if key is not None:
            self._built[key] = result
        return result

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, scalars), deduplicated."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"{self.prefix}const_{len(self._consts)}"
            tensor = onnx.numpy_helper.from_array(arr, name)
            if self.sink is None:
                self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            else:
                self.initializers.append(tensor)
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.sink(name, array))
        return name

    def attr(self, name: str) -> str:
        """Inside a function body: the calling node's int attribute `name` as an int64 [1] tensor."""
        ref = onnx.AttributeProto(name="value_int", type=onnx.AttributeProto.INT, ref_attr_name=name)
        node = helper.make_node("Constant", [], [f"{self.prefix}attr_{name}"])
        node.attribute.append(ref)
        self.nodes.append(node)
        return self.op("Reshape", node.output[0], self.const([1]))

    def set_shape(self, x: str, dims: list) -> None:
        """Declare x's shape: ints (static) or int64 [1] tensors (dynamic, e.g. one T for the whole
        graph). g.dim(x, axis) then returns those instead of a Shape node per tensor, which lets
        onnxruntime fold static arithmetic and lets every layer share the dynamic one."""
        self._shapes[x] = [self.const([d]) if isinstance(d, int) else d for d in dims]

    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as an int64 [1] tensor."""
        if x in self._shapes:
            return self._shapes[x][axis]
        return self.op("Shape", x, start=axis, end=axis + 1)

    def f32(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.FLOAT)

    def like(self, x: str, ref: str) -> str:
        """fp32 x cast to the dtype of ref, a model-dtype tensor: nothing in an fp32 graph
        (onnxruntime keeps a CastLike to the same type as a copy)."""
        return x if self.model_dtype == TensorProto.FLOAT else self.op("CastLike", x, ref)


def _node_key(op_type: str, domain: str, inputs: tuple, n_out: int, attrs: dict) -> tuple | None:
    """Identity of a node for reuse: None (never reused) when an attribute is not a plain value."""
    plain = (int, float, str)
    for v in attrs.values():
        if not (isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(e, plain) for e in v))):
            return None
    return op_type, domain, inputs, n_out, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                         for k, v in attrs.items()))


def grouped_scores(g: GraphBuilder, keys: str, q: str) -> str:
    """q·k / sqrt(D) for every key row, kv head, query head of its group and query: fp32
    [S, Hkv, G, T]. keys [S, Hkv, D] (token-major) are the left operand, viewed as [S*Hkv, D]:
    read once and never copied (see the module docstring); q is [T, Hq, D]."""
    T, Hq, Hkv, D = g.dim(q, 0), g.dim(q, 1), g.dim(keys, 1), g.dim(keys, 2)
    G = g.op("Div", Hq, Hkv)
    # Flat index of (kv head h, query group h) among the Hkv x Hkv pairs the MatMul scores.
    diag = g.op("Mul", g.op("Range", g.const(0), g.op("Squeeze", Hkv), g.const(1)), g.op("Add", Hkv, g.const([1])))
    # All queries as columns [D, Hkv*G*T], pre-scaled by 1/sqrt(D).
    q4 = g.op("Reshape", q, g.op("Concat", T, Hkv, G, D, axis=0))
    qt = g.op("Reshape", g.op("Transpose", q4, perm=[3, 1, 2, 0]), g.op("Concat", D, g.const([-1]), axis=0))
    qt = g.like(g.op("Mul", g.f32(qt), g.op("Reciprocal", g.op("Sqrt", g.f32(D)))), q)
    rows = g.op("Reshape", keys, g.op("Concat", g.const([-1]), D, axis=0))
    s = g.f32(g.op("MatMul", rows, qt))  # [S*Hkv, Hkv*G*T]
    s = g.op("Reshape", s, g.op("Concat", g.const([-1]), g.op("Mul", Hkv, Hkv), G, T, axis=0))
    return g.op("Gather", s, diag, axis=1)


def attend(g: GraphBuilder, q, k, v, past_k, past_v, new_mask, past_mask=None):
    """GQA attention of new queries over past + new keys (any dtype, any head counts).

    q [T, Hq, D]; k, v [T, Hkv, D]; past_k, past_v [P, Hkv, D]; new_mask bool broadcastable to
    [Tk, Hkv, 1, Tq] (visibility among the new tokens); past_mask, if given, [P, Hkv, 1, Tq].
    Past and new score blocks share one fp32 softmax; their weighted sums are added, so the
    cache is never concatenated. Returns [T, Hq*D] in q's dtype.
    """
    T, Hkv, D = g.dim(q, 0), g.dim(k, 1), g.dim(k, 2)
    neg_inf = g.const(-np.inf, np.float32)
    s_past = grouped_scores(g, past_k, q)
    if past_mask is not None:
        s_past = g.op("Where", past_mask, s_past, neg_inf)
    s_new = g.op("Where", new_mask, grouped_scores(g, k, q), neg_inf)
    probs = g.op("Softmax", g.op("Concat", s_past, s_new, axis=0), axis=0)  # [S, Hkv, G, T]
    n_past = g.dim(past_k, 0)
    n_queries = g.op("Mul", g.dim(q, 1), T)  # Hq*T = Hkv*G*T score columns

    def weighted(first, count, values):  # probs rows [first, first+count) x values -> [Hkv*G*T, Hkv*D]
        p = g.op("Slice", probs, first, g.op("Add", first, count), g.const([0]))
        pt = g.op("Transpose", g.like(p, q), perm=[1, 2, 3, 0])
        # count may be 0 (first prefill): explicit dims with allowzero, since -1 or a 0 would not work.
        pt = g.op("Reshape", pt, g.op("Concat", n_queries, count, axis=0), allowzero=1)
        return g.op("MatMul", pt, g.op("Reshape", values, g.op("Concat", g.const([0]), g.op("Mul", Hkv, D), axis=0)))

    both = g.op("Add", weighted(g.const([0]), n_past, past_v), weighted(n_past, T, v))  # [Hkv*G*T, Hkv*D]
    # Keep the blocks where the query's kv head equals the value's kv head.
    diag = g.op("Mul", g.op("Range", g.const(0), g.op("Squeeze", Hkv), g.const(1)), g.op("Add", Hkv, g.const([1])))
    both = g.op("Reshape", both, g.op("Concat", Hkv, g.const([-1]), Hkv, D, axis=0))
    both = g.op("Reshape", g.op("Transpose", both, perm=[0, 2, 1, 3]),
                g.op("Concat", g.op("Mul", Hkv, Hkv), g.const([-1]), D, axis=0))
    out = g.op("Reshape", g.op("Gather", both, diag, axis=0), g.op("Concat", Hkv, g.const([-1]), T, D, axis=0))
    return g.op("Reshape", g.op("Transpose", out, perm=[2, 0, 1, 3]), g.op("Concat", T, g.const([-1]), axis=0))
