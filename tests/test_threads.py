"""A Session shared by threads (DESIGN.md §3): requests are serialized, never a crash or a wrong
answer; a stream abandoned mid-way leaves the session consistent."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import edgecpm

pytest.importorskip("torch", reason="the tiny checkpoints are written and exported with torch")

PROMPTS = [[1, 17, 250, 33, 4, 99, 7], [1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 300, 301, 302]]
KW = {"max_new_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def paths(make_checkpoint, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="the bundle runs on onnxruntime (pip install 'edgecpm[ort]')")
    from edgecpm.export.exporter import export_bundle

    ckpt = make_checkpoint(tie=False, with_tokenizer=True)  # streams yield text pieces
    return {"torch": ckpt, "onnxruntime": export_bundle(ckpt, tmp_path_factory.mktemp("thr") / "b", progress=False)}


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("draft", [None, "ngram"])
def test_threads_sharing_a_session_get_plain_answers(paths, backend, draft):
    want = [edgecpm.Session(paths[backend]).generate(p, **KW).token_ids for p in PROMPTS]
    s = edgecpm.Session(paths[backend], draft=draft)
    got: dict[tuple[int, int], list[int]] = {}
    errors: list[BaseException] = []

    def worker(t: int):
        try:
            for r in range(3):
                i = (t + r) % len(PROMPTS)
                if r % 2:  # streams and whole generations interleave
                    pieces = s.stream(PROMPTS[i], **KW)
                    for _ in pieces:
                        pass
                    got[t, r] = s.generate(PROMPTS[i], **KW).token_ids
                else:
                    got[t, r] = s.generate(PROMPTS[i], **KW).token_ids
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert len(got) == 12
    for (t, r), ids in got.items():
        assert ids == want[(t + r) % len(PROMPTS)], (t, r)
    # Still right afterwards.
    assert s.generate(PROMPTS[0], **KW).token_ids == want[0]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_abandoned_stream_leaves_session_consistent(paths, backend):
    ref = edgecpm.Session(paths[backend])
    want = ref.generate(PROMPTS[1], **KW).token_ids
    s = edgecpm.Session(paths[backend], draft="ngram")
    stream = s.stream(PROMPTS[0], **KW)
    next(stream)  # left open, holding the session
    # A new request on the same thread ends that stream and answers as a fresh session would.
    assert s.generate(PROMPTS[1], **KW).token_ids == want
    assert list(stream) == []
    np.testing.assert_array_equal(s.cache.ids[: len(PROMPTS[1])], PROMPTS[1])
    # A stream broken off by the caller (`break`) releases the session for other threads.
    for _ in s.stream(PROMPTS[0], **KW):
        break
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("ids", s.generate(PROMPTS[1], **KW).token_ids))
    th.start()
    th.join(timeout=120)
    assert out.get("ids") == want


def test_other_thread_waits_for_an_open_stream(paths):
    s = edgecpm.Session(paths["onnxruntime"])
    want = edgecpm.Session(paths["onnxruntime"]).generate(PROMPTS[2], **KW).token_ids
    stream = s.stream(PROMPTS[0], **KW)
    next(stream)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("ids", s.generate(PROMPTS[2], **KW).token_ids))
    th.start()
    th.join(timeout=1.0)
    assert th.is_alive() and "ids" not in out  # serialized: it waits for the stream to end
    rest = list(stream)
    th.join(timeout=120)
    assert rest and out["ids"] == want
