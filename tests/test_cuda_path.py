"""The torch backend's CUDA path, host logic on CPU: the device-resident arena (run on CPU tensors),
the decode-graph bookkeeping (an eager stand-in for CUDA graph capture) and the binding of
edgecpm's kernels (argument checks and the call sequence against a fake library). No kernel runs
here and no CUDA graph is captured: plugins/tests/gpu_check.sh does that on a GPU."""

from __future__ import annotations

import ctypes
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import rel_err, tiny_config

import edgecpm
from edgecpm.config import ModelConfig, SparseConfig
from edgecpm.errors import BackendUnavailable
from edgecpm.export.checkpoint import load_model
from edgecpm.kv_cache import KVCache
from edgecpm.runtimes import cuda_kernels, decode_graphs
from edgecpm.runtimes import torch as torch_runtime
from edgecpm.runtimes.device_arena import DeviceArena
from edgecpm.runtimes.torch import TorchBackend

ROOT = Path(__file__).resolve().parents[1]
SPARSE = {"dense_len": 128, "window_size": 128, "topk": 2}


class EagerCapture:
    """Stands in for CUDA graph capture: 'replay' reruns the captured function and refreshes the
    static outputs in place, so a step sees only what the static input buffers hold."""

    def __init__(self):
        self.captures, self.replays = 0, 0

    def capture(self, fn):
        self.captures += 1
        outputs = fn()

        def replay():
            self.replays += 1
            for static, new in zip(outputs, fn(), strict=True):
                static.copy_(new)

        return replay, outputs


def resident_backend(path, capture=None) -> TorchBackend:
    """The CUDA path's backend, on CPU tensors: a device arena, and decode graphs when `capture`."""
    b = TorchBackend.__new__(TorchBackend)
    b._attach(load_model(path, torch.float32), torch.device("cpu"), torch.float32, resident=True,
              decode_graphs=capture is not None, capture=capture)
    return b


@pytest.fixture(scope="module")
def dense_ckpt(make_checkpoint):
    return make_checkpoint()


@pytest.fixture(scope="module")
def sparse_ckpt(make_checkpoint):
    return make_checkpoint(tie=False, sparse_config=SPARSE, hidden_size=256, num_attention_heads=4,
                           num_key_value_heads=1, intermediate_size=128, num_hidden_layers=2)


def repetitive_prompt(n: int, seed: int = 0) -> list[int]:
    """A prompt that repeats itself, so n-gram drafts get accepted (and the arena compacted)."""
    rng = np.random.default_rng(seed)
    motif = rng.integers(3, 500, size=23).tolist()
    return [1] + (motif * (n // len(motif) + 1))[: n - 1]


# ---- the device arena ------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [None, "ngram"])
def test_resident_dense_session_equals_the_host_path(dense_ckpt, spec):
    """Greedy tokens and logits of the resident arena + decode graphs equal the numpy-arena path,
    with speculative decoding (trees, then KVCache.keep mirrored on the arena) too; the session's
    numpy arena is never written (the rows live in the device arena only)."""
    draft = None if spec is None else edgecpm.SpecConfig(draft=spec)
    prompt = repetitive_prompt(300)
    host = edgecpm.Session(dense_ckpt, backend="torch", kv_budget="1MiB", draft=draft)
    capture = EagerCapture()
    backend = resident_backend(dense_ckpt, capture)
    dev = edgecpm.Session.from_backend(backend, kv_budget="1MiB", draft=draft)
    a = host.generate(prompt, max_new_tokens=40, ignore_eos=True)
    b = dev.generate(prompt, max_new_tokens=40, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert backend.arena.nbytes == dev.cache.bytes_allocated  # the same byte budget
    assert not dev.cache.arena.any()  # nothing went through the host arena
    n = dev.cache.length
    assert np.allclose(backend.arena.kv[:, :, :n].numpy(), host.cache.arena[:, :, :n], atol=1e-5)
    if spec is None:  # every decode step was a replay; the prompt length 300 needs span 512 only
        assert capture.captures == 1 and capture.replays == 39 and list(backend.graphs.graphs) == [512]
    else:
        assert b.stats.get("accepted_tokens", 1) > 0


def test_resident_sparse_session_equals_the_host_path(sparse_ckpt):
    """InfLLM v2 past dense_len with speculative trees: the device arena's rows and compressed keys
    (written in place, recomputed after compaction) equal the numpy arena's; no decode graph
    (the sparse kernels take the past length by value)."""
    draft = edgecpm.SpecConfig(draft="ngram")
    prompt = repetitive_prompt(200, seed=1)
    host = edgecpm.Session(sparse_ckpt, backend="torch", kv_budget="4MiB", draft=draft)
    backend = resident_backend(sparse_ckpt, EagerCapture())
    dev = edgecpm.Session.from_backend(backend, kv_budget="4MiB", draft=draft)
    a = host.generate(prompt, max_new_tokens=30, ignore_eos=True)
    b = dev.generate(prompt, max_new_tokens=30, ignore_eos=True)
    assert a.token_ids == b.token_ids and backend.graphs is None
    n = dev.cache.length
    nc = dev.config.sparse.n_chunks(n)
    assert n > SPARSE["dense_len"] and nc > 0
    assert np.allclose(backend.arena.kv[:, :, :n].numpy(), host.cache.arena[:, :, :n], atol=1e-5)
    assert np.allclose(backend.arena.ck[:, :nc].numpy(), host.cache.ckeys[:, :nc], atol=1e-5)


def test_arena_mirrors_keep_and_window_compaction():
    """DeviceArena.keep (the keep hook) does what KVCache._compact does to the numpy arena: random
    writes, keeps (rows + compressed keys) and window evictions, compared after each."""
    cfg = ModelConfig.from_dict(tiny_config(sparse_config=SPARSE))
    rng = np.random.default_rng(0)
    for policy in ("error", "window"):
        cache = KVCache(cfg, 300, np.float32, policy=policy)
        arena = DeviceArena(cfg, cache.capacity, torch.float32, torch.device("cpu"))
        cache.keep_hooks.append(arena.keep)
        for _ in range(30):
            T = int(rng.integers(1, 40))
            if not cache.make_room(T):
                break
            shape = (cfg.num_hidden_layers, T, cfg.num_key_value_heads, cfg.head_dim)
            k, v = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
            for i in range(cfg.num_hidden_layers):
                ks, vs = cache.slot(i, T)
                ks[:], vs[:] = k[i], v[i]
            arena.write(cache.length, torch.from_numpy(k), torch.from_numpy(v))
            cache.commit(np.zeros(T, np.int64))
            if policy == "error" and cache.length > 50 and rng.random() < 0.5:
                start = int(rng.integers(0, cache.length))
                tail = np.arange(start, cache.length)
                cache.keep(start, np.sort(rng.choice(tail, size=int(rng.integers(0, len(tail) + 1)), replace=False)))
            n = cache.length
            assert np.array_equal(arena.kv[:, :, :n].numpy(), cache.arena[:, :, :n])
            # The numpy arena's own chunks of the moved rows were recomputed by _compact.
            nc = cfg.sparse.n_chunks(n)
            moved = cache.ckeys[:, :nc].any()
            assert not moved or np.allclose(arena.ck[:, :nc].numpy()[cache.ckeys[:, :nc] != 0],
                                            cache.ckeys[:, :nc][cache.ckeys[:, :nc] != 0], atol=1e-6)
        assert arena.nbytes == cache.bytes_allocated


def test_decode_graph_logits_survive_the_next_replay(dense_ckpt):
    """A step's logits are a copy of the graph's static output, not a view the next replay rewrites."""
    from edgecpm.generate import decode_one_token, prefill

    backend = resident_backend(dense_ckpt, EagerCapture())
    cache = KVCache(backend.config, 64, backend.kv_dtype)
    prefill(backend, cache, [1, 5, 7])
    first = decode_one_token(backend, cache, 9)
    kept = first.copy()
    second = decode_one_token(backend, cache, 11)
    assert np.array_equal(first, kept) and not np.array_equal(first, second)
    assert backend.last_hidden.shape == (1, backend.config.hidden_size)


def test_arena_is_bound_to_one_cache(dense_ckpt):
    backend = resident_backend(dense_ckpt)
    s = edgecpm.Session.from_backend(backend, kv_budget="1MiB")
    s.generate([1, 5, 7], max_new_tokens=2, ignore_eos=True)
    other = KVCache(backend.config, 64, backend.kv_dtype)
    other.commit(np.array([1, 2], np.int64))
    ids, pos = np.array([3]), np.array([2])
    with pytest.raises(RuntimeError, match="another KVCache"):
        backend.forward(ids, pos, np.ones((1, 1), bool), other, np.array([0]))


# ---- decode graphs -----------------------------------------------------------------------------------
def test_bucket_spans():
    assert decode_graphs.bucket(0, 10_000) == decode_graphs.MIN_BUCKET
    assert decode_graphs.bucket(255, 10_000) == 256 and decode_graphs.bucket(256, 10_000) == 512
    assert decode_graphs.bucket(4095, 10_000) == 4096 and decode_graphs.bucket(4096, 10_000) == 8192
    assert decode_graphs.bucket(9000, 10_000) == 10_000  # capped at the arena
    assert decode_graphs.bucket(10, 100) == 100
    with pytest.raises(ValueError, match="does not fit"):
        decode_graphs.bucket(100, 100)


def test_decode_graphs_refresh_static_inputs_before_each_replay():
    """One capture per span; every run replays with the new token, position and length in the
    static buffers (a replay that saw stale inputs would return the captured step's values)."""
    seen = []

    def step(span, ids, positions, length):
        out = torch.stack([ids[0, 0], positions[0, 0], length[0], torch.tensor(span)])
        seen.append(out.tolist())
        return (out,)

    capture = EagerCapture()
    graphs = decode_graphs.DecodeGraphs(step, torch.device("cpu"), capture)
    for n, length in enumerate((5, 6, 300, 7)):
        (out,) = graphs.run(token=100 + n, position=length + 10, length=length, capacity=1000)
        assert out.tolist() == [100 + n, length + 10, length, decode_graphs.bucket(length, 1000)]
    assert capture.captures == 2 and capture.replays == 4 and sorted(graphs.graphs) == [256, 512]


# ---- dense prefill through SDPA ---------------------------------------------------------------------
@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_dense_prefill_equals_the_sparse_op_below_dense_len(tree, dtype, tol):
    """A chunk of queries all below dense_len: SDPA over past + masked new rows gives the op's
    output and compressed keys (a plain chunk, and a draft tree whose positions are depths)."""
    from edgecpm.export.infllmv2 import sparse_attention

    cfg = SparseConfig(dense_len=400, window_size=128, topk=2)
    g = torch.Generator().manual_seed(3)
    T, P, Hq, Hkv, D = 20, 300, 8, 2, 16
    q, k, v = (torch.randn(T, h, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))
    pk, pv = torch.randn(P, Hkv, D, generator=g).to(dtype), torch.randn(P, Hkv, D, generator=g).to(dtype)
    ck = torch.randn(cfg.n_chunks(P), Hkv, D, generator=g)
    mask, pos = torch.ones(T, T, dtype=torch.bool).tril(), torch.arange(P, P + T)
    if tree:  # node i's parent is (i - 1) // 2: positions are depths, siblings hidden
        mask, depth = gpu_check().tree_mask(torch, T, g, parents=[-1] + [(i - 1) // 2 for i in range(1, T)])
        pos = P + depth
    out, ck_new = torch_runtime.dense_prefill(q, k, v, pk, pv, pos, mask, cfg)
    ref_out, ref_ck = sparse_attention(q, k, v, pk, pv, ck, pos, mask, cfg)
    assert rel_err(out.float(), ref_out.float()) < tol and torch.equal(ck_new, ref_ck)


def test_dense_prefill_only_below_dense_len_and_past_the_decode_path():
    cfg = SparseConfig(dense_len=400, window_size=128, topk=2)
    args = lambda T, P: (torch.zeros(T, 4, 16), torch.zeros(T, 2, 16), torch.zeros(T, 2, 16),  # noqa: E731
                         torch.zeros(P, 2, 16), torch.zeros(P, 2, 16), torch.arange(P, P + T),
                         torch.ones(T, T, dtype=torch.bool).tril(), cfg)
    assert torch_runtime.dense_prefill(*args(20, 300)) is not None
    assert torch_runtime.dense_prefill(*args(20, 380)) is None  # position 399 + 1 reaches dense_len
    assert torch_runtime.dense_prefill(*args(8, 100)) is None  # the kernels' decode path


# ---- kernel binding -----------------------------------------------------------------------------------
class FakeLib:
    """The C ABI's host view: records each call's arguments, answers with `status`."""

    def __init__(self, status=0, version=cuda_kernels.ABI_VERSION):
        self.status, self.version, self.calls = status, version, []

    def ecpm_version(self):
        return self.version

    def ecpm_status_string(self, status):
        return {1: b"invalid argument"}.get(status, b"?")

    def ecpm_infllmv2_workspace_size(self, dims, cfg):
        return 1000 + dims.P

    def ecpm_infllmv2_forward(self, *args):
        self.calls.append(("forward", args))
        return self.status

    def ecpm_ternary_matmul(self, *args):
        self.calls.append(("ternary", args))
        return self.status


def attn_inputs(T=2, P=110, Hq=4, Hkv=2, D=16, dtype=torch.float16):
    cfg = SparseConfig(**SPARSE)
    q = torch.randn(T, Hq, D).to(dtype)
    k, v = torch.randn(T, Hkv, D).to(dtype), torch.randn(T, Hkv, D).to(dtype)
    pk, pv = torch.randn(P, Hkv, D).to(dtype), torch.randn(P, Hkv, D).to(dtype)
    ck = torch.randn(cfg.n_chunks(P), Hkv, D)
    pos = torch.arange(P, P + T)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return [q, k, v, pk, pv, ck, pos, mask], cfg


def test_infllmv2_binding_passes_pointers_dims_config_and_workspace():
    args, cfg = attn_inputs()
    lib = FakeLib()
    out, ck_new = cuda_kernels.Kernels(lib).infllmv2(*args, cfg)
    (name, a), = lib.calls
    q, k, v, pk, pv, ck, _, _ = args
    assert a[0] == cuda_kernels.DTYPES[torch.float16]
    assert [p.value for p in a[1:7]] == [t.data_ptr() for t in (q, k, v, pk, pv, ck)]
    dims, c = a[9], a[10]._obj
    assert (dims.T, dims.P, dims.Hq, dims.Hkv, dims.D) == (2, 110, 4, 2, 16)
    assert (c.kernel_size, c.kernel_stride, c.block_size, c.window_size, c.topk, c.dense_len, c.semantics) == \
        (32, 16, 64, 128, 2, 128, 1)
    assert a[11].value == out.data_ptr() and a[12].value == ck_new.data_ptr() and a[14] == 1110  # workspace bytes
    assert out.shape == q.shape and out.dtype == q.dtype
    assert ck_new.shape == (cfg.n_chunks(112) - cfg.n_chunks(110), 2, 16) == (1, 2, 16)
    assert ck_new.dtype == torch.float32
    assert a[15].value is None  # CPU tensors: stream 0 (a CUDA tensor passes torch's current stream)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.__setitem__(0, a[0].bfloat16()), "fp32 or fp16"),
    (lambda a: a.__setitem__(1, a[1].float()), "differ in dtype"),
    (lambda a: a.__setitem__(5, a[5][:-1]), "past_ck"),
    (lambda a: a.__setitem__(5, a[5].half()), "not float32"),
    (lambda a: a.__setitem__(3, a[3][:-1]), "past_k/past_v"),
    (lambda a: a.__setitem__(0, a[0][:, :3]), "multiple of Hkv"),
    (lambda a: a.__setitem__(6, a[6][:1]), "positions"),
    (lambda a: a.__setitem__(3, a[3].transpose(0, 1).contiguous().transpose(0, 1)), "not contiguous"),
])
def test_infllmv2_binding_refuses_bad_arguments_before_the_call(change, message):
    args, cfg = attn_inputs()
    change(args)
    lib = FakeLib()
    with pytest.raises(ValueError, match=message):
        cuda_kernels.Kernels(lib).infllmv2(*args, cfg)
    assert lib.calls == []


def test_infllmv2_binding_refuses_head_dim_the_kernels_do_not_take():
    args, cfg = attn_inputs(D=12)
    with pytest.raises(ValueError, match="D % 8 == 0"):
        cuda_kernels.Kernels(FakeLib()).infllmv2(*args, cfg)


def test_kernel_status_becomes_an_error():
    args, cfg = attn_inputs()
    with pytest.raises(cuda_kernels.KernelError, match="ecpm_infllmv2_forward: invalid argument"):
        cuda_kernels.Kernels(FakeLib(status=1)).infllmv2(*args, cfg)


def test_ternary_binding():
    M, N, K, g = 3, 40, 64, 32
    x, packed, scales = torch.randn(M, K).half(), torch.zeros(N, K // 16, dtype=torch.int32), torch.rand(N, 2).half()
    lib = FakeLib()
    y = cuda_kernels.Kernels(lib).ternary(x, packed, scales, K, g)
    (_, a), = lib.calls
    assert y.shape == (M, N) and y.dtype == torch.float16
    assert [p.value for p in a[1:5]] == [x.data_ptr(), packed.data_ptr(), scales.data_ptr(), y.data_ptr()]
    assert a[5:9] == (M, N, K, g)
    bad = [((x.bfloat16(), packed, scales.bfloat16(), K, g), "fp32 or fp16"),
           ((x, packed, scales.float(), K, g), "scales are"),
           ((x, packed.long(), scales, K, g), "not int32"),
           ((x, packed, scales, K, 48), "does not divide"),
           ((x, packed[:, :3], scales, K, g), "packed"),
           ((x, packed, scales[:, :1], K, g), "scales"),
           ((x[:, :32], packed, scales, K, g), "features")]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            cuda_kernels.Kernels(lib).ternary(*call)
    assert len(lib.calls) == 1


def test_binding_signatures_match_the_header():
    text = re.sub(r"/\*.*?\*/", "", (ROOT / "plugins" / "include" / "edgecpm_kernels.h").read_text(), flags=re.S)
    for name, (_, argtypes) in cuda_kernels.SIGNATURES.items():
        m = re.search(rf"\b{name}\s*\(([^)]*)\)\s*;", text)
        params = m.group(1).strip()
        assert (0 if params in ("", "void") else params.count(",") + 1) == len(argtypes), name


def test_bind_checks_the_abi_version():
    lib = types.SimpleNamespace(**{name: (lambda *args: 0) for name in cuda_kernels.SIGNATURES})
    lib.ecpm_version = lambda: 100  # plain functions: bind() can set their restype/argtypes
    with pytest.raises(BackendUnavailable, match="ABI 100"):
        cuda_kernels.bind(lib)
    assert lib.ecpm_infllmv2_forward.argtypes == cuda_kernels.SIGNATURES["ecpm_infllmv2_forward"][1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_a_gpu_the_cuda_path_says_why(make_checkpoint):
    with pytest.raises(cuda_kernels.KernelsUnavailable, match="need a CUDA GPU"):
        cuda_kernels.load()
    sparse = make_checkpoint(sparse_config=SPARSE)
    with pytest.raises(cuda_kernels.KernelsUnavailable, match="need a CUDA GPU"):
        TorchBackend(str(sparse), device="cuda")


def test_build_without_nvcc_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_kernels.shutil, "which", lambda name: None)
    with pytest.raises(cuda_kernels.KernelsUnavailable, match="nvcc is not on PATH"):
        cuda_kernels.build(tmp_path / "libedgecpm_kernels.so")


def test_bf16_with_kernels_is_refused_before_loading(make_checkpoint, monkeypatch):
    monkeypatch.setattr(torch_runtime, "use_cuda_kernels", lambda: pytest.fail("must refuse before loading"))
    model = load_model(make_checkpoint(sparse_config=SPARSE), torch.bfloat16)
    b = TorchBackend.__new__(TorchBackend)
    with pytest.raises(ValueError, match="run dtype='fp16'"):
        b._attach(model, torch.device("cuda"), torch.bfloat16)


def gpu_check():
    """plugins/tests/gpu_check.py as a module (its reference helpers run on the CPU)."""
    sys.path.insert(0, str(ROOT / "plugins" / "tests"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_ctypes_structs_match_the_gpu_check():
    """Dims and Config have the header's field order (the GPU check's copies were checked on the
    real library by tests/test_plugins_compile.py)."""
    check = gpu_check()
    for ours, theirs in ((cuda_kernels.Dims, check.Dims), (cuda_kernels.Config, check.Config)):
        assert ours._fields_ == theirs._fields_ and ctypes.sizeof(ours) == ctypes.sizeof(theirs)


def test_session_takes_a_device_for_the_torch_backend(make_checkpoint, tmp_path):
    """Session(..., device=) reaches the torch backend (its arena on that device); a bundle refuses it."""
    import edgecpm
    from edgecpm.errors import ConfigError
    from edgecpm.export.exporter import export_bundle

    ckpt = make_checkpoint()
    s = edgecpm.Session(ckpt, backend="torch", device="cpu")
    assert s.backend.device.type == "cpu"
    with pytest.raises(ConfigError, match="device='cpu' applies to the torch backend"):
        edgecpm.Session(export_bundle(ckpt, tmp_path / "b", progress=False), device="cpu")
