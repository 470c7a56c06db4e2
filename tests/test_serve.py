"""`edgecpm serve` over loopback with the official openai client, on the wind-tunnel target
exported to an onnxruntime bundle: answers equal Session's, concurrent streams equal solo runs,
disconnects and budget exhaustion, size limits and keys, structured output, clean shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # to export the bundle
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import edgecpm
from edgecpm.backends import open_backend, open_tokenizer
from edgecpm.serve.app import create_app
from edgecpm.serve.engine import Engine

TARGET = Path(__file__).resolve().parents[1] / "samples" / "wind_tunnel" / "target"
MODEL = "bundle"  # the bundle folder's name is the model id
LONG = {"ignore_eos": True}  # an extension: generate to max_tokens (keeps a request running)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgecpm.export.exporter import export_bundle

    if not (TARGET / "model.safetensors").exists():
        pytest.skip(f"{TARGET} has no weights")
    return export_bundle(TARGET, tmp_path_factory.mktemp("serve") / MODEL, progress=False)


@pytest.fixture(scope="module")
def session(bundle):
    return edgecpm.Session(bundle)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(bundle, api_key=None, max_body_bytes=1 << 20, **engine_options):
    """An in-process server on a free loopback port; yields (base url, engine)."""
    backend = open_backend(bundle)
    engine = Engine(backend, open_tokenizer(bundle, backend), **engine_options)
    port = free_port()
    config = uvicorn.Config(create_app(engine, MODEL, api_key, max_body_bytes), host="127.0.0.1", port=port,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join()
        engine.close()


@pytest.fixture(scope="module")
def server(bundle):
    with running_server(bundle, kv_budget="64MiB", max_sessions=16) as (url, engine):
        yield url, engine


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def chat_stream_text(c, messages, **kwargs) -> str:
    chunks = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True, **kwargs)
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def test_models_and_health(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == [MODEL]
    h = health(url)
    assert h["status"] == "ok" and h["kv_budget_bytes"] == 64 * 2**20


def test_chat_and_completions_equal_session(server, session):
    url, _ = server
    c = client(url)
    want = session.chat().send("def main():", max_new_tokens=24)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "def main():"}],
                                  temperature=0, max_tokens=24)
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == len(want.token_ids)
    assert chat_stream_text(c, [{"role": "user", "content": "def main():"}], max_tokens=24) == want.text

    g = session.generate("import sys\n", max_new_tokens=24)
    r = c.completions.create(model=MODEL, prompt="import sys\n", temperature=0, max_tokens=24)
    assert r.choices[0].text == g.text
    pieces = c.completions.create(model=MODEL, prompt="import sys\n", temperature=0, max_tokens=24, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == g.text


def test_multi_turn_reuses_the_cached_history(server, session):
    """Turn 2 equals Chat.send's second turn and prefills only the new user turn."""
    url, _ = server
    c = client(url)
    chat = session.chat(system="You write Python.")
    first = chat.send("class Parser:", max_new_tokens=16)
    second_ids_before = list(chat.ids)
    second = chat.send("def close(self):", max_new_tokens=16)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "class Parser:"}]
    r1 = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    assert r1.choices[0].message.content == first.text
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "def close(self):"}]
    before = health(url)["prefill_tokens"]
    r2 = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    assert r2.choices[0].message.content == second.text
    # Like the Session: the new turn, plus the reply's last token and "<|im_end|>\n" (never run)
    prefilled = health(url)["prefill_tokens"] - before
    assert prefilled == second.stats["prefill_tokens"] <= r2.usage.prompt_tokens - len(second_ids_before) + 3


def test_sixteen_concurrent_streams_equal_their_solo_answers(server):
    url, _ = server
    c = client(url)
    prompts = [[{"role": "user", "content": f"def task_{i}(x):"}] for i in range(16)]
    solo = [chat_stream_text(c, m, max_tokens=20) for m in prompts]
    got, first_piece, finished = [None] * 16, [0.0] * 16, [0.0] * 16
    clients, together = [client(url) for _ in range(16)], threading.Barrier(16)

    def run(i):
        together.wait()
        chunks = clients[i].chat.completions.create(model=MODEL, messages=prompts[i], temperature=0, max_tokens=20,
                                                     stream=True)
        text = ""
        for ch in chunks:
            if ch.choices and ch.choices[0].delta.content:
                first_piece[i] = first_piece[i] or time.monotonic()
                text += ch.choices[0].delta.content
        got[i], finished[i] = text, time.monotonic()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == solo
    # They ran together: every stream had its first piece before any stream ended.
    assert max(first_piece) < min(finished)
    assert health(url)["peak_running"] == 16


def wait_for(url: str, cond, timeout: float = 10.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = health(url)
        if cond(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"timed out; /health says {h}")


def test_disconnect_frees_kv_at_once(server):
    url, _ = server
    before = wait_for(url, lambda h: h["running"] == 0)
    stream = client(url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "import os"}], temperature=0, max_tokens=3000,
        stream=True, extra_body=LONG)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    running = health(url)
    assert running["running"] == 1 and running["kv_active_bytes"] > 0
    stream.close()
    after = wait_for(url, lambda h: h["running"] == 0, timeout=3.0)  # 3000 tokens would take far longer
    assert after["kv_active_bytes"] == 0
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert after["kv_idle_bytes"] <= before["kv_idle_bytes"]  # freed, not kept as a cached prefix

    # A client waiting for a whole (non-streamed) answer that gives up cancels its request too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", timeout=1.0, json={
            "model": MODEL, "prompt": "import os", "max_tokens": 3000, "temperature": 0, **LONG})
    gone = wait_for(url, lambda h: h["running"] == 0, timeout=2.0)
    assert gone["cancelled"] == after["cancelled"] + 1 and gone["kv_active_bytes"] == 0


def test_budget_exhaustion_gives_429_and_503(bundle):
    per_token = 4096  # wind-tunnel target: 8 layers x 2 kv heads x 32 dims x K,V x fp32
    with running_server(bundle, kv_budget=2300 * per_token, max_queue=1, queue_timeout=0.5) as (url, engine):
        assert engine.pool.bytes_per_token == per_token
        c = client(url)
        messages = [{"role": "user", "content": "import os"}]
        holder = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=2000,
                                           stream=True, extra_body=LONG)
        next(iter(holder))
        results = {}

        def waiter():
            try:
                c.chat.completions.create(model=MODEL, messages=messages, max_tokens=2000)
            except openai.APIStatusError as e:
                results["waiter"] = e

        t = threading.Thread(target=waiter)
        t.start()
        wait_for(url, lambda h: h["waiting"] == 1)
        with pytest.raises(openai.APIStatusError) as queue_full:
            c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        assert queue_full.value.status_code == 429 and "busy" in queue_full.value.message
        t.join()
        assert results["waiter"].status_code == 503 and "within 0.5 s" in results["waiter"].message
        holder.close()
        wait_for(url, lambda h: h["running"] == 0)
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)  # still serving
        assert r.choices[0].finish_reason in ("stop", "length")
        # max_tokens beyond what one request's KV holds is capped, not refused
        assert engine.max_new_tokens(10, 10**9, 256) == engine.pool.max_capacity - 10


def test_size_limits_model_ids_and_bad_requests(server):
    url, _ = server
    c = client(url)
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model=MODEL, prompt="x = 1\n" * 3000, max_tokens=4)  # > max_position_embeddings
    assert e.value.status_code == 413 and "prompt has" in e.value.message
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="../../etc/passwd", prompt="x", max_tokens=4)
    for bad in ({"n": 2}, {"logprobs": 2}, {"temperature": -1}, {"max_tokens": 0}, {"stop": [""]},
                {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", **bad})
        assert r.status_code == 400, (bad, r.text)
    assert httpx.post(f"{url}/v1/completions", content=b"{not json").status_code == 400


def test_api_key(bundle):
    with running_server(bundle, api_key="s3cret", kv_budget="16MiB") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert [m.id for m in client(url, "s3cret").models.list().data] == [MODEL]


def test_json_schema_response_is_valid(server):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    url, _ = server
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "size", "ok", "kind"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "size": {"type": "integer", "minimum": 0, "maximum": 999},
                             "ok": {"type": "boolean"}, "kind": {"enum": ["file", "dir"]}}}
    c = client(url)
    for prompt in ("def read(path):", "import os\n\nclass Tree:"):  # the model would rather write code
        r = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=80,
            response_format={"type": "json_schema", "json_schema": {"name": "entry", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "import os"}], temperature=0,
                                  max_tokens=80, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_shuts_down_cleanly_on_signal(bundle, sig):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgecpm.cli", "serve", str(bundle), "--port", str(port),
                             "--kv-budget", "16MiB"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if health(url)["status"] == "ok":
                    break
            assert proc.poll() is None and time.monotonic() < end, proc.stdout.read()
            time.sleep(0.1)
        assert client(url).completions.create(model=MODEL, prompt="import", max_tokens=4).choices
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "Finished server process" in out


# ---- the KV pool and the engine without HTTP ----------------------------------------------------
def tiny_pool(budget_tokens: int):
    from conftest import tiny_config

    from edgecpm.config import ModelConfig
    from edgecpm.serve.kv_pool import KVPool

    cfg = ModelConfig.from_dict(tiny_config())
    per_token = cfg.kv_bytes_per_token(4)
    return KVPool(cfg, np.float32, budget_tokens * per_token)


def fill(cache, ids):
    cache.commit(np.asarray(ids, np.int64))  # stands for a prefill: the rows' values do not matter here


def test_pool_reuses_continuations_copies_shared_prefixes_and_keeps_the_budget():
    pool = tiny_pool(100)
    a = pool.acquire([1, 5, 6, 7], 40)
    fill(a, [1, 5, 6, 7, 8, 9])
    a.arena[:, :, :6] = 3.0
    pool.release(a, keep=True)
    assert pool.acquire([1, 5, 6, 7, 8, 9, 10, 11], 40) is a  # a continuation takes the idle cache itself
    pool.release(a, keep=True)
    b = pool.acquire([1, 5, 6, 99, 98], 40)  # shares 3 tokens: a copy of them, `a` stays for its conversation
    assert b is not a and b.ids.tolist() == [1, 5, 6] and np.all(b.arena[:, :, :3] == 3.0)
    assert pool.idle == [a]
    c = pool.acquire([2, 3], 40)  # 40 + 40 + 40 > 100: the idle cache is evicted to make room
    assert pool.idle == [] and pool.bytes_of(pool.active) <= pool.budget
    assert pool.acquire([2, 3], 30) is None  # running requests hold the budget: wait
    pool.release(c, keep=False)
    assert pool.acquire([2, 3], 30) is not None
    assert pool.bytes_of(pool.active + pool.idle) <= pool.budget
    assert pool.cache_bytes(40) == b.bytes_allocated


def run_job(engine, ids, max_tokens=24):
    from edgecpm.serve.engine import Job

    events, done = [], threading.Event()

    def sink(event):
        events.append(event)
        if event[0] in ("done", "error"):
            done.set()

    engine.submit(Job(ids, max_tokens, edgecpm.SamplingParams(), sink))
    assert done.wait(60)
    return events[-1][1]


def test_engine_with_ngram_drafting_equals_plain_greedy(bundle, session):
    backend = open_backend(bundle)
    engine = Engine(backend, open_tokenizer(bundle, backend), kv_budget="16MiB", draft="ngram")
    try:
        for prompt in ("import os\nimport sys\nimport os\n", "def f(x):\n    return x\n\ndef g(x):\n"):
            ids = session.tokenizer.encode(prompt)
            want = session.generate(ids, max_new_tokens=32)
            got = run_job(engine, ids, 32)
            assert got.token_ids == want.token_ids and got.stats["accepted_per_step"] > 1.0
    finally:
        engine.close()
    with pytest.raises(edgecpm.ConfigError, match="ngram"):
        Engine(backend, None, draft=str(TARGET))


def test_a_long_prompt_is_prefilled_in_turns_with_other_requests(bundle):
    """A 1300-token prompt runs one prefill chunk (512 tokens here) per scheduler turn: a short
    request submitted with it finishes before the long one yields its first piece."""
    from edgecpm.serve.engine import Job

    backend = open_backend(bundle)
    engine = Engine(backend, open_tokenizer(bundle, backend), kv_budget="64MiB")
    events, ended = [], threading.Semaphore(0)

    def sink(name):
        def put(event):
            events.append((name, event[0]))
            if event[0] in ("done", "error"):
                ended.release()
        return put

    long_ids = [1, *np.random.default_rng(0).integers(10, 8000, 1300).tolist()]
    try:
        engine.submit(Job(long_ids, 4, edgecpm.SamplingParams(), sink("long"), ignore_eos=True))
        engine.submit(Job([1, 500, 600], 1, edgecpm.SamplingParams(), sink("short"), ignore_eos=True))  # 2 turns
        assert ended.acquire(timeout=60) and ended.acquire(timeout=60)
        assert engine.stats()["prefill_tokens"] == len(long_ids) + 3  # every prompt token ran once
    finally:
        engine.close()
    assert events.index(("short", "done")) < events.index(("long", "piece")), events


def test_chat_prompts_render_the_models_template(session):
    """Any order of roles gives the template's text (BOS first, the generation prompt last);
    bad messages are refused."""
    from edgecpm.serve.chat_prompt import ChatPrompts, normalize

    tok = session.tokenizer
    prompts = ChatPrompts(tok)
    for raw in ([{"role": "user", "content": "a"}],
                [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                 {"role": "assistant", "content": "b"}, {"role": "user", "content": [{"type": "text", "text": "c"}]}],
                [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"},
                 {"role": "user", "content": "y"}],
                [{"role": "system", "content": "S"}],
                [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]):
        messages = normalize(raw)
        want = tok.decode([tok.bos_token_id], skip_special_tokens=False) + tok.render_chat(messages)
        assert tok.decode(prompts.ids(messages), skip_special_tokens=False) == want
    for bad in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(ValueError):
            normalize(bad)
