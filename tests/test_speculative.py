"""Speculative decoding: exact at temperature 0 for every drafter, lossless when sampling, and the
KV arena after verification equals decoding the accepted tokens one by one."""

from __future__ import annotations

import math

import numpy as np
import pytest

import edgecpm
from edgecpm.config import ModelConfig
from edgecpm.drafters import DraftTree, NgramDrafter, SpecConfig
from edgecpm.errors import ConfigError
from edgecpm.frspec import build_freq_table, load_freq_table

torch = pytest.importorskip("torch")
PROMPT = [1, 17, 250, 33, 4, 99, 7, 17, 250]


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint(tie=False)


@pytest.fixture(scope="module")
def greedy(ckpt):
    """The plain greedy continuation of PROMPT (the reference every drafter must reproduce)."""
    return edgecpm.Session(ckpt).generate(PROMPT, max_new_tokens=30, ignore_eos=True).token_ids


class Scripted:
    """Proposes the reference continuation (an oracle), optionally made wrong, as a chain or a
    tree with a wrong sibling beside every right node."""

    def __init__(self, reference, vocab, depth=4, wrong=False, tree=False):
        self.ref, self.vocab, self.depth, self.wrong, self.tree = list(reference), vocab, depth, wrong, tree

    def propose(self, context):
        nxt = self.ref[len(context) : len(context) + self.depth]
        if self.wrong:
            nxt = [(t + 1) % self.vocab for t in nxt]
        if not self.tree:
            return DraftTree.chain(nxt)
        tokens, parents, parent = [], [], -1
        for t in nxt:  # the decoy first, so the right child is not always index 0
            tokens += [(t + 3) % self.vocab, t]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return DraftTree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64))


def run(ckpt, draft, n=30, **kw):
    s = edgecpm.Session(ckpt, draft=draft)
    return s, s.generate(PROMPT, max_new_tokens=n, ignore_eos=True, **kw)


@pytest.mark.parametrize("kind", ["oracle", "oracle-tree", "wrong", "wrong-tree", "ngram", "self-chain",
                                  "self-tree"])
def test_greedy_identical(ckpt, greedy, kind):
    ref = PROMPT + greedy
    draft = {
        "oracle": lambda: SpecConfig(draft=Scripted(ref, 512)),
        "oracle-tree": lambda: SpecConfig(draft=Scripted(ref, 512, tree=True)),
        "wrong": lambda: SpecConfig(draft=Scripted(ref, 512, wrong=True)),
        "wrong-tree": lambda: SpecConfig(draft=Scripted(ref, 512, wrong=True, tree=True)),
        "ngram": lambda: "ngram",
        "self-chain": lambda: SpecConfig(draft=str(ckpt), depth=4, tree_size=4),
        "self-tree": lambda: SpecConfig(draft=str(ckpt), depth=3, branch=2, tree_size=6),
    }[kind]()
    _, g = run(ckpt, draft)
    assert g.token_ids == greedy
    if kind.startswith("oracle"):
        assert g.stats["accepted_per_step"] == pytest.approx(5.0, abs=0.6)  # 4 drafted + 1 per step
    if kind.startswith("wrong"):
        assert g.stats["accepted_per_step"] == 1.0


@pytest.mark.parametrize("penalty", [1.1, 1.3])
@pytest.mark.parametrize("kind", ["oracle-tree", "ngram", "self-tree"])
def test_greedy_identical_with_repetition_penalty(ckpt, kind, penalty):
    """The penalty depends on every emitted token, accepted draft tokens included. On this prompt
    the plain greedy output cycles, so the penalty changes what is emitted."""
    prompt, kw = [1, 17, 250, 33, 4, 99, 7], {"repetition_penalty": penalty}
    want = edgecpm.Session(ckpt).generate(prompt, max_new_tokens=30, ignore_eos=True, **kw).token_ids
    assert want != edgecpm.Session(ckpt).generate(prompt, max_new_tokens=30, ignore_eos=True).token_ids
    draft = {
        "oracle-tree": lambda: SpecConfig(draft=Scripted(prompt + want, 512, tree=True)),
        "ngram": lambda: "ngram",
        "self-tree": lambda: SpecConfig(draft=str(ckpt), depth=3, branch=2, tree_size=6),
    }[kind]()
    g = edgecpm.Session(ckpt, draft=draft).generate(prompt, max_new_tokens=30, ignore_eos=True, **kw)
    assert g.token_ids == want
    if kind == "oracle-tree":
        assert g.stats["accepted_per_step"] > 3  # the drafts were accepted, so the rule was exercised


def test_eos_inside_the_draft_stops_there(ckpt, greedy):
    eos = greedy[6]  # a token the target emits mid-way through an accepted draft
    plain = edgecpm.Session(ckpt)
    plain.eos_ids = {eos}
    want = plain.generate(PROMPT, max_new_tokens=30)
    s = edgecpm.Session(ckpt, draft=SpecConfig(draft=Scripted(PROMPT + greedy, 512, depth=5)))
    s.eos_ids = {eos}
    g = s.generate(PROMPT, max_new_tokens=30)
    assert g.finish_reason == want.finish_reason == "eos"
    assert g.token_ids == want.token_ids == greedy[: greedy.index(eos)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 11])
def test_max_new_tokens_mid_acceptance(ckpt, greedy, n):
    s, g = run(ckpt, SpecConfig(draft=Scripted(PROMPT + greedy, 512, depth=5)), n=n)
    assert g.token_ids == greedy[:n] and g.finish_reason == "length"
    # The cache holds the prompt and every emitted token but the last, as plain decoding leaves it.
    assert s.cache.length == len(PROMPT) + n - 1


@pytest.mark.parametrize("tree", [True, False])
def test_kv_arena_equals_one_by_one(ckpt, greedy, tree):
    """After accepts and rejects (drafts that are partly right) the arena equals the plain run's:
    a tree's accepted rows are compacted, a chain's accepted prefix stays in place."""
    ref = PROMPT + greedy

    class HalfRight(Scripted):
        def propose(self, context):
            tree = super().propose(context)
            if len(context) % 3 == 0:  # every third step the second level is wrong
                tree.tokens[3 if self.tree else 1 :] += 1
                tree.tokens %= 512
            return tree

    plain = edgecpm.Session(ckpt)
    plain.generate(PROMPT, max_new_tokens=25, ignore_eos=True)
    s, g = run(ckpt, SpecConfig(draft=HalfRight(ref, 512, tree=tree)), n=25)
    assert 1.0 < g.stats["accepted_per_step"] < 5.0  # both accepts and rejects happened
    n = plain.cache.length
    assert s.cache.length == n
    np.testing.assert_allclose(s.cache.arena[:, :, :n], plain.cache.arena[:, :, :n], rtol=1e-4, atol=1e-5)


# ---- FR-Spec --------------------------------------------------------------------------------

def test_freq_table_rules():
    counts = np.array([5, 0, 9, 9, 1, 7, 0, 3])
    t = build_freq_table(counts, r=4, eos_ids=[6], special_ids=[2])
    assert t.dtype == np.int32 and len(t) == 4 and len(set(t.tolist())) == 4
    assert t.tolist() == [3, 5, 0, 6]  # 2 is special (not counted), ties rank the lower id, EOS forced in


def test_freq_table_validation(tmp_path):
    p = tmp_path / "f.npy"
    np.save(p, np.array([1, 2, 2, 5], np.int32))
    with pytest.raises(ConfigError, match="duplicate"):
        load_freq_table(p, 10, [5])
    np.save(p, np.array([1, 2, 12, 5], np.int32))
    with pytest.raises(ConfigError, match="out of range"):
        load_freq_table(p, 10, [5])
    np.save(p, np.array([1, 2, 3], np.int32))
    with pytest.raises(ConfigError, match="EOS ids \\[5\\]"):
        load_freq_table(p, 10, [5])


def test_frspec_draft_bundle_target_token_outside_subset(ckpt, greedy, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgecpm.export.exporter import export_bundle

    # A table of V/4 ids that leaves out every token of the reference continuation.
    cfg = ModelConfig.from_file(ckpt)
    counts = np.ones(cfg.vocab_size)
    counts[greedy] = 0
    table = build_freq_table(counts, r=cfg.vocab_size // 4, eos_ids=cfg.eos_token_ids, special_ids=[])
    assert not set(greedy) & set(table.tolist())
    np.save(tmp_path / "freq.npy", table)
    draft = export_bundle(ckpt, tmp_path / "draft", frspec=tmp_path / "freq.npy", progress=False)
    _, g = run(ckpt, SpecConfig(draft=str(draft), depth=3))
    assert g.token_ids == greedy
    assert g.stats["accepted_per_step"] == 1.0  # nothing the draft can say is ever right


def test_draft_with_other_vocabulary_refused(ckpt, make_checkpoint):
    other = make_checkpoint(vocab_size=300)
    with pytest.raises(ConfigError, match="vocabulary 300 differs"):
        edgecpm.Session(ckpt, draft=str(other))


def test_ngram_drafter_prompt_lookup():
    d = NgramDrafter(SpecConfig(tree_size=3, depth=3, ngram_max=2))
    assert d.propose([5, 6, 7, 8, 9, 5, 6]).tokens.tolist() == [7, 8, 9]
    assert d.propose([1, 2, 3]).tokens.tolist() == []


def test_ngram_drafter_votes_backs_off_and_follows_the_context():
    d = NgramDrafter(SpecConfig(tree_size=2, depth=2, ngram_max=2))
    # (1, 2) was followed by 7 twice and by 8 once (the latest): the majority wins; then (2, 7) -> 1.
    assert d.propose([1, 2, 7, 1, 2, 7, 1, 2, 8, 1, 2]).tokens.tolist() == [7, 1]
    # A tie goes to the most recent occurrence.
    assert d.propose([1, 2, 7, 1, 2, 8, 1, 2]).tokens.tolist() == [8, 1]
    # The context grew by accepted tokens: the table is extended, not rebuilt, with the same result.
    ctx = [1, 2, 7, 1, 2, 8, 1, 2]
    assert d.propose(ctx + [8, 1, 2]).tokens.tolist() == NgramDrafter(d.spec).propose(ctx + [8, 1, 2]).tokens.tolist()
    # A single-token match is below ngram_min (2) by default; with ngram_min=1 it drafts.
    assert d.propose([5, 9, 4, 5]).tokens.tolist() == []
    assert NgramDrafter(SpecConfig(depth=2, ngram_min=1)).propose([5, 9, 4, 5]).tokens.tolist() == [9, 4]
    with pytest.raises(ValueError, match="ngram_min"):
        SpecConfig(ngram_min=5, ngram_max=4)


def test_default_spec_per_target_size():
    from edgecpm.drafters import default_spec

    small, large = ModelConfig.from_dict(_real("MiniCPM4-0.5B")), ModelConfig.from_dict(_real("MiniCPM4-8B"))
    assert (default_spec(small).depth, default_spec(large).depth, default_spec(small).ngram_min) == (12, 4, 1)
    assert default_spec(small).ngram_max == default_spec(large).ngram_max == 6
    assert (default_spec(small).min_confidence, default_spec(large).min_confidence) == (0.3, 0.0)
    assert default_spec(large, "head/", eagle=True) == SpecConfig(draft="head/", depth=3, tree_size=3)
    d = default_spec(large, "draft/")
    assert (d.depth, d.tree_size, d.phrases) == (2, 4, True)


def _real(name):
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "minicpm4" / name / "config.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return json.loads(path.read_text())


# ---- lossless sampling on a toy vocabulary -------------------------------------------------------

V = 6


class TrigramBackend:
    """A Backend whose next-token logits depend on the last two tokens of the context it sees.

    It stores each token id in its key row, so it reads the context back from the KV arena: a
    wrong compaction after verification would change the distribution the test measures.
    """

    name = "toy"
    kv_dtype = np.dtype(np.float32)
    weight_bytes = 0
    bundle = None
    ternary_kernel = None
    has_hidden = False
    last_hidden = None
    max_prefill_chunk = None

    def __init__(self, table):
        self.table = table  # [V, V, V] logits for (previous, current) -> next
        self.config = ModelConfig.from_dict({
            "model_type": "minicpm", "vocab_size": V, "hidden_size": 2, "intermediate_size": 1,
            "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "eos_token_id": [V - 1],
        })

    def on_keep(self, start, rows):
        pass

    def forward(self, ids, positions, attn_mask, cache, logit_index, hidden_in=None):
        past = cache.keys[0][: cache.length, 0, 0]
        k, _ = cache.slot(0, len(ids))
        k[:, 0, 0] = ids
        out = []
        for t in logit_index:
            ancestors = np.flatnonzero(attn_mask[t, :t])
            prev = ids[ancestors[-1]] if len(ancestors) else int(past[-1])
            out.append(self.table[int(prev), ids[t]])
        return np.array(out, dtype=np.float32)


class RandomTreeDrafter:
    """Draws a 2-level tree (2 children of the root, 1 grandchild each) from its own trigram."""

    def __init__(self, table, rng):
        self.table, self.rng = table, rng

    def draw(self, a, b, k):
        p = np.exp(self.table[a, b])
        return self.rng.choice(V, size=k, replace=False, p=p / p.sum())

    def propose(self, context):
        a, b = context[-2], context[-1]
        kids = self.draw(a, b, 2)
        grand = [self.draw(b, c, 1)[0] for c in kids]
        return DraftTree(np.array([*kids, *grand]), np.array([-1, -1, 0, 1]))


def chi2_critical(df: int, z: float = 3.29) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile (z = 3.29: p = 0.0005)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def check_two_token_distribution(s, target: np.ndarray, n: int) -> np.ndarray:
    """Sample n two-token continuations of [0, 1, 2] at temperature 1 from Session s (a trigram
    target `target` and some drafter): the draft must be accepted in over a tenth of the draws, and
    the first token and the (first, second) pair must follow the target's own distribution
    (chi-square at p = 0.0005). Returns p1, the target's first-token distribution."""
    joint = np.zeros((V, V))
    with_acceptance = 0  # draws in which the target accepted a draft token
    for i in range(n):
        g = s.generate([0, 1, 2], max_new_tokens=3, temperature=1.0, seed=i, ignore_eos=True)
        joint[g.token_ids[0], g.token_ids[1]] += 1
        with_acceptance += g.stats["accepted_per_step"] > 1.0
    assert with_acceptance > n // 10
    p1 = softmax(target[1, 2])
    expected = np.array([[p1[x] * softmax(target[2, x])[y] for y in range(V)] for x in range(V)]) * n
    assert ((joint.sum(1) - p1 * n) ** 2 / (p1 * n)).sum() < chi2_critical(V - 1)
    assert ((joint - expected) ** 2 / expected).sum() < chi2_critical(V * V - 1)
    return p1


def test_speculative_sampling_is_lossless():
    rng = np.random.default_rng(0)
    target = rng.normal(0, 1.0, size=(V, V, V))
    drafter = RandomTreeDrafter(rng.normal(0, 1.0, size=(V, V, V)) + 0.5 * target, np.random.default_rng(1))
    s = edgecpm.Session.from_backend(TrigramBackend(target), kv_budget=64 * 64, draft=SpecConfig(draft=drafter))
    n = 20_000
    p1 = check_two_token_distribution(s, target, n)
    # The test has power: the draft's own distribution is far from the target's.
    draft_p1 = softmax(drafter.table[1, 2])
    assert ((draft_p1 * n - p1 * n) ** 2 / (p1 * n)).sum() > 10 * chi2_critical(V - 1)


@pytest.mark.parametrize("m", [0, 1, 4])
def test_chain_fast_path_equals_the_tree_walk(m):
    """A chain's depths, mask and children come from numpy directly; the per-node walk every other
    tree takes gives the same (a repeated token included)."""
    chain = DraftTree.chain([5, 7, 5, 5][:m])
    walked = DraftTree(chain.tokens, chain.parents)
    walked.is_chain = lambda: False
    assert chain.is_chain()
    np.testing.assert_array_equal(chain.depths(), walked.depths())
    np.testing.assert_array_equal(chain.ancestor_mask(), walked.ancestor_mask())
    assert chain.children() == walked.children()


def test_a_bare_draft_takes_the_measured_defaults(make_checkpoint):
    """draft="ngram" (or a path) means default_spec for the target and drafter; a SpecConfig is kept
    as given; the CLI passes the bare draft unless a --draft-* option is set."""
    import argparse

    from edgecpm.cli_options import spec_config
    from edgecpm.drafters import SpecConfig, default_spec

    ckpt = make_checkpoint()
    s = edgecpm.Session(ckpt, backend="torch", draft="ngram")
    assert s.spec == default_spec(s.config, "ngram") and s.spec.ngram_min == 1
    mine = SpecConfig(draft="ngram", depth=2, tree_size=2)
    assert edgecpm.Session(ckpt, backend="torch", draft=mine).spec == mine
    own = NgramDrafter(mine)  # a drafter object: used as it is, with SpecConfig's defaults
    assert edgecpm.Session(ckpt, backend="torch", draft=own).drafter is own
    args = argparse.Namespace(draft="ngram", draft_depth=None, draft_tree_size=None, draft_branch=None,
                              draft_corpus=None)
    assert spec_config(args) == "ngram"
    args.draft_depth = 3
    assert spec_config(args) == SpecConfig(draft="ngram", depth=3, tree_size=3)
