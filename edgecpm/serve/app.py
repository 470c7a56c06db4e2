"""The HTTP side of `edgecpm serve`: OpenAI's /v1/chat/completions, /v1/completions and /v1/models,
plus /health (the engine's counters and KV bytes), on FastAPI + uvicorn (`pip install 'edgecpm[serve]'`).

Requests are read as plain JSON and checked here (bad fields: 400; body or prompt too large: 413;
unknown model: 404; missing or wrong bearer key: 401), then queued on the Engine. The handler
waits for the request's first event, so a request refused for lack of KV budget gets a JSON error
(429/503) rather than an empty stream. A streaming client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgecpm.sampling import SamplingParams
from edgecpm.serve.chat_prompt import ChatPrompts, normalize
from edgecpm.serve.engine import Engine, Job, Refused

DEFAULT_MAX_TOKENS = 256  # when a request names none (capped by the KV budget either way)
MAX_BODY_BYTES = 1 << 20
DISCONNECT_CHECK_S = 0.25  # how often a handler waiting on its job checks that its client is still there


def create_app(engine: Engine, model_id: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               max_prompt_tokens: int | None = None) -> FastAPI:
    app = FastAPI(title="edgecpm", docs_url=None, redoc_url=None, openapi_url=None)
    chats = ChatPrompts(engine.tokenizer) if engine.tokenizer else None

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error"}.get(e.status, "server_error")
        return JSONResponse({"error": {"message": str(e), "type": kind, "param": None, "code": e.status}},
                            status_code=e.status)

    async def bearer_key(request: Request):
        given = request.headers.get("authorization", "")
        if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise Refused(401, "missing or wrong API key (Authorization: Bearer KEY)")

    # A dependency, not an HTTP middleware: Starlette's middleware wrapper hides a client's
    # disconnect from the handler, which needs to see it to cancel the request.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer_key)])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.stats()}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_id)]}

    @v1.get("/models/{name:path}")
    async def model(name: str):
        _check_model(name, model_id)
        return _model_card(model_id)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, max_body_bytes)
        _check_model(body.get("model"), model_id)
        if chats is None:
            raise Refused(400, f"model {model_id!r} has no tokenizer files: chat needs them")
        messages = _or_400(normalize, body.get("messages"))
        ids = chats.ids(messages)
        job = await asyncio.to_thread(_job, engine, body, ids, max_prompt_tokens)  # a grammar may take a while

        def finished(g):
            chats.remember(messages, ids, g)

        async with _cancel_if_client_leaves(engine, job, request):
            events = await _start(engine, job)
            if body.get("stream"):
                return _sse(engine, job, events, _ChatChunks(model_id), body, finished)
            g = await _collect(events)
        finished(g)
        return {**_head("chat.completion", model_id), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
            "finish_reason": _finish(g)}], "usage": _usage(job, g)}

    @v1.post("/completions")
    async def completions(request: Request):
        body = await _read_body(request, max_body_bytes)
        _check_model(body.get("model"), model_id)
        ids = _prompt_ids(engine, body.get("prompt"))
        job = await asyncio.to_thread(_job, engine, body, ids, max_prompt_tokens)  # a grammar may take a while
        async with _cancel_if_client_leaves(engine, job, request):
            events = await _start(engine, job)
            if body.get("stream"):
                return _sse(engine, job, events, _TextChunks(model_id), body, None)
            g = await _collect(events)
        return {**_head("text_completion", model_id), "choices": [{
            "index": 0, "text": g.text, "logprobs": None, "finish_reason": _finish(g)}], "usage": _usage(job, g)}

    app.include_router(v1)
    return app


# ---- requests -----------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"request body of {declared} bytes is over the limit of {limit}")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise Refused(413, f"request body is over the limit of {limit} bytes")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Refused(400, f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise Refused(400, "request body must be a JSON object")
    return body


def _or_400(fn, *args):
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        raise Refused(400, str(e)) from None


def _check_model(name, model_id: str) -> None:
    if name != model_id:
        raise Refused(404, f"model {name!r} is not served here; this server serves {model_id!r}")


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "edgecpm"}


def _prompt_ids(engine: Engine, prompt) -> list[int]:
    """A completion prompt: text (encoded with BOS, as Session.generate does) or token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        if engine.tokenizer is None:
            raise Refused(400, "this model has no tokenizer files: send the prompt as token ids")
        return engine.tokenizer.encode(prompt)
    vocab = engine.config.vocab_size
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < vocab for t in prompt):
        return prompt
    raise Refused(400, f"'prompt' must be a non-empty string or a list of token ids in [0, {vocab})")


def _job(engine: Engine, body: dict, ids: list[int], max_prompt_tokens: int | None) -> Job:
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise Refused(413, f"prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens}")
    if body.get("n", 1) != 1:
        raise Refused(400, "only n=1 is supported")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise Refused(400, "logprobs are not supported")
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    if requested is not None and (type(requested) is not int or requested < 1):
        raise Refused(400, f"max_tokens={requested!r}: must be an integer >= 1")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
        raise Refused(400, "'stop' must be a non-empty string or a list of them")
    params = _or_400(SamplingParams, _number(body, "temperature", 1.0), _number(body, "top_p", 1.0), 0, 1.0,
                     body.get("seed"))
    ignore_eos = bool(body.get("ignore_eos", False))  # an extension (as in vLLM): benchmarks, tests
    return Job(ids, engine.max_new_tokens(len(ids), requested, DEFAULT_MAX_TOKENS), params, sink=None, stop=stop,
               ignore_eos=ignore_eos, constraint=_constraint(engine, body.get("response_format"), ignore_eos))


def _number(body: dict, name: str, default: float):
    value = body.get(name)
    return default if value is None else value


def _constraint(engine: Engine, fmt, ignore_eos: bool):
    """response_format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}}}."""
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise Refused(400, "response_format: expected type 'text', 'json_object' or 'json_schema'")
    schema = {"type": "object"}
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise Refused(400, "response_format json_schema: expected {'name': ..., 'schema': {...}}")
    from edgecpm.structured import JsonConstraint

    eos = set() if ignore_eos else engine.eos_ids
    return _or_400(JsonConstraint, engine.tokenizer, schema, engine.config.vocab_size, eos)


async def _start(engine: Engine, job: Job) -> asyncio.Queue:
    """Queue the job; return its event queue once it runs (Refused when it never will)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(event):
        with contextlib.suppress(RuntimeError):  # the loop is gone (server stopped): nobody listens
            loop.call_soon_threadsafe(events.put_nowait, event)

    job.sink = sink
    engine.submit(job)
    first = await events.get()
    if first[0] == "error":
        raise Refused(first[1], first[2])
    return events


async def _collect(events: asyncio.Queue):
    while True:
        event = await events.get()
        if event[0] == "done":
            return event[1]
        if event[0] == "error":
            raise Refused(event[1], event[2])


@contextlib.asynccontextmanager
async def _cancel_if_client_leaves(engine: Engine, job: Job, request: Request):
    """While a handler waits on its job (queued, or generating a whole answer), a client that
    disconnects cancels the job: its KV is freed and the handler gets the job's last event."""

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_CHECK_S)
        engine.cancel(job)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


# ---- responses ----------------------------------------------------------------------------
def _head(kind: str, model_id: str) -> dict:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model_id}


def _finish(g) -> str:
    return "length" if g.finish_reason == "length" else "stop"  # OpenAI's names: eos and stop strings are "stop"


def _usage(job: Job, g) -> dict:
    n = len(g.token_ids)
    return {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}


class _ChatChunks:
    def __init__(self, model_id: str):
        self.head = _head("chat.completion.chunk", model_id)

    def first(self) -> dict | None:
        return self.chunk({"role": "assistant", "content": ""}, None)

    def piece(self, text: str) -> dict:
        return self.chunk({"content": text}, None)

    def last(self, finish: str) -> dict:
        return self.chunk({}, finish)

    def chunk(self, delta: dict, finish) -> dict:
        return {**self.head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


class _TextChunks:
    def __init__(self, model_id: str):
        self.head = _head("text_completion", model_id)

    def first(self) -> dict | None:
        return None

    def piece(self, text: str) -> dict:
        return self.chunk(text, None)

    def last(self, finish: str) -> dict:
        return self.chunk("", finish)

    def chunk(self, text: str, finish) -> dict:
        return {**self.head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def _sse(engine: Engine, job: Job, events: asyncio.Queue, chunks, body: dict, finished) -> StreamingResponse:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def lines():
        if (first := chunks.first()) is not None:
            yield data(first)
        while True:
            event = await events.get()
            if event[0] == "piece":
                yield data(chunks.piece(event[1]))
            elif event[0] == "done":
                g = event[1]
                if finished:
                    finished(g)
                yield data(chunks.last(_finish(g)))
                if include_usage:
                    yield data({**chunks.head, "choices": [], "usage": _usage(job, g)})
                break
            else:  # the status line is sent already: the error goes in the stream
                yield data({"error": {"message": event[2], "type": "server_error", "code": event[1]}})
                break
        yield "data: [DONE]\n\n"

    return _JobStream(lambda: engine.cancel(job), lines(), media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache"})


class _JobStream(StreamingResponse):
    """A streaming response that cancels its job when it ends for any reason: a client that
    disconnects (Starlette cancels the response, possibly before the body started) frees its KV
    at once; after a finished job, cancelling is a no-op."""

    def __init__(self, on_close, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def serve(path, host: str = "127.0.0.1", port: int = 8000, backend: str = "auto", kv_budget="2GiB", draft=None,
          threads: int | None = None, max_sessions: int = 8, max_queue: int = 64, queue_timeout: float = 30.0,
          api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, max_prompt_tokens: int | None = None,
          log_level: str = "info") -> None:
    """Load the model once and serve it until SIGINT/SIGTERM: uvicorn stops accepting, lets open
    responses finish for up to 10 s, then the engine stops and this returns."""
    import signal
    import threading

    import uvicorn

    from edgecpm.backends import open_backend, open_tokenizer

    path = Path(path)
    runner = open_backend(path, backend, threads=threads)
    engine = Engine(runner, open_tokenizer(path, runner), kv_budget, draft, max_sessions, max_queue, queue_timeout)
    app = create_app(engine, path.resolve().name, api_key, max_body_bytes, max_prompt_tokens)
    # uvicorn re-raises the signal that stopped it once it is done, with the handler it found: a
    # no-op one makes that signal mean "shut down cleanly" (exit status 0), not die or raise.
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    finally:
        engine.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
