"""The serving engine: many requests on one backend (one copy of the weights).

    engine = Engine(backend, tokenizer, kv_budget="2GiB")
    job = Job(ids, max_tokens=64, params=SamplingParams(), sink=events.append)
    engine.submit(job)            # events: ("admitted",), ("piece", text)..., ("done", Generation);
                                  # or, at any point, a last ("error", http status, message)
    engine.cancel(job)            # the client went away: its KV cache is freed at once

One scheduler thread owns the backend. Each running request is a `generate_text` generator (the
same loop Session runs) over its own KVCache from the pool; the thread advances them in turn, one
`next()` each (a decode step up to the next text piece; a long prompt is prefilled one chunk
per turn), so requests progress together. Requests wait in a bounded FIFO until the pool can
hold them: a full queue is refused at once (429), a wait longer than `queue_timeout` ends with
503. Nothing a request does can take the server down: a request's error ends that request only.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgecpm.drafters import NgramDrafter, SpecConfig, default_spec
from edgecpm.errors import ConfigError, EdgeCPMError
from edgecpm.generate import generate_text, prefill, prefill_chunk
from edgecpm.kv_cache import parse_bytes
from edgecpm.sampling import SamplingParams
from edgecpm.serve.kv_pool import KVPool

CANCELLED = ("error", 499, "cancelled: the client went away")


class Refused(EdgeCPMError):
    """A request the server will not run; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Job:
    ids: list[int]
    max_tokens: int
    params: SamplingParams
    sink: object  # called with each event, from the scheduler thread
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    constraint: object = None  # edgecpm.structured.JsonConstraint
    cancelled: bool = False
    enqueued: float = 0.0
    cache: object = None
    run: object = None  # the generate_text generator while it runs
    started: bool = False  # run has been stepped (the prompt's chunks before its last one are done)


class Engine:
    def __init__(self, backend, tokenizer, kv_budget: int | str = "1GiB", draft: SpecConfig | str | None = None,
                 max_sessions: int = 8, max_queue: int = 64, queue_timeout: float = 30.0):
        spec = default_spec(backend.config, draft) if isinstance(draft, str) else draft
        if spec is not None and spec.draft != "ngram":
            # A draft model would need a second KV pool in step with the first; not built yet.
            raise ConfigError(f"serve: draft={spec.draft!r}: the server drafts with 'ngram' only")
        if backend.name == "tensorrt" or getattr(backend, "resident", False):
            # Such a backend mirrors one KVCache in device memory; the pool's caches take turns.
            raise ConfigError(f"serve: the {backend.name} backend keeps one request's KV on the device; serve "
                              f"runs on onnxruntime or on torch on the CPU for now")
        if max_sessions < 1 or max_queue < 1 or queue_timeout <= 0:
            raise ValueError("max_sessions and max_queue must be >= 1 and queue_timeout > 0")
        self.backend, self.tokenizer, self.spec = backend, tokenizer, spec
        self.config = backend.config
        self.eos_ids = set(self.config.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self.pool = KVPool(self.config, backend.kv_dtype, parse_bytes(kv_budget))
        if self.pool.max_capacity < 2:
            raise ConfigError(f"kv_budget of {self.pool.budget} bytes holds {self.pool.max_capacity} tokens "
                              f"({self.pool.bytes_per_token} bytes per token); raise it")
        self.max_sessions, self.max_queue, self.queue_timeout = max_sessions, max_queue, queue_timeout
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        # Requests by outcome; prefill_tokens: prompt tokens run (not taken from a cached prefix);
        # peak_running: the most requests that ran together.
        self.counts = {"completed": 0, "cancelled": 0, "rejected": 0, "failed": 0, "prefill_tokens": 0,
                       "peak_running": 0}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="edgecpm-scheduler", daemon=True)
        self._thread.start()

    # ---- called from request handlers (any thread) -----------------------------------------
    def max_new_tokens(self, prompt_tokens: int, requested: int | None, default: int) -> int:
        """max_tokens capped by what one request's KV can hold; Refused(413) for a prompt that
        leaves no room to generate."""
        room = self.pool.max_capacity - prompt_tokens
        if room < 1:
            raise Refused(413, f"prompt has {prompt_tokens} tokens but one request can hold at most "
                               f"{self.pool.max_capacity - 1} (KV budget {self.pool.budget} bytes, "
                               f"{self.pool.bytes_per_token} bytes per token); shorten the prompt")
        return min(requested or default, room)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise Refused(503, "the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise Refused(429, f"server busy: {len(self.running)} requests running and {len(self.waiting)} "
                                   f"waiting (queue limit {self.max_queue}); retry later")
            job.enqueued = time.monotonic()
            self.waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (no-op once it ended); its KV cache is freed, not kept for reuse."""
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            pool = self.pool
            return {
                "running": len(self.running),
                "waiting": len(self.waiting),
                **self.counts,
                "kv_budget_bytes": pool.budget,
                "kv_bytes_per_token": pool.bytes_per_token,
                "kv_max_tokens_per_request": pool.max_capacity,
                "kv_active_bytes": pool.bytes_of(pool.active),
                "kv_idle_bytes": pool.bytes_of(pool.idle),
                "kv_idle_caches": len(pool.idle),
                "kv_used_tokens": sum(c.length for c in pool.active + pool.idle),
            }

    def close(self) -> None:
        """Stop the scheduler; requests still waiting or running end with 503."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # ---- the scheduler thread --------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    self._shut_down()
                    return
                self._admit()
                if not self.running:
                    self._cond.wait(timeout=0.05 if self.waiting else None)
                    continue
                jobs = list(self.running)
            for job in jobs:
                self._step(job)

    def _admit(self) -> None:
        """Start waiting jobs in order while the pool and max_sessions allow; expire old ones."""
        now = time.monotonic()
        for job in [j for j in self.waiting if j.cancelled or now - j.enqueued > self.queue_timeout]:
            self.waiting.remove(job)
            if job.cancelled:
                self.counts["cancelled"] += 1
                job.sink(CANCELLED)
            else:
                self.counts["rejected"] += 1
                job.sink(("error", 503, f"server busy: no KV budget freed up within {self.queue_timeout:g} s "
                                        f"(budget {self.pool.budget} bytes); retry later"))
        while self.waiting and len(self.running) < self.max_sessions:
            job = self.waiting[0]
            cache = self.pool.acquire(job.ids, len(job.ids) + job.max_tokens)
            if cache is None:
                return  # first come, first served: later jobs wait behind this one
            self.waiting.popleft()
            drafter = NgramDrafter(self.spec) if self.spec else None
            eos = set() if job.ignore_eos else self.eos_ids
            job.cache = cache
            job.run = generate_text(self.backend, cache, self.tokenizer, job.ids, job.max_tokens, job.params,
                                    job.stop, eos, drafter, constraint=job.constraint)
            self.running.append(job)
            self.counts["peak_running"] = max(self.counts["peak_running"], len(self.running))
            job.sink(("admitted",))

    def _step(self, job: Job) -> None:
        if job.cancelled:
            job.sink(CANCELLED)
            self._end(job, "cancelled", keep=False)
            return
        try:
            if not job.started and self._prefill_chunk(job):
                return
            job.started = True
            job.sink(("piece", next(job.run)))
        except StopIteration as end:
            job.sink(("done", end.value))
            self.counts["prefill_tokens"] += end.value.stats["prefill_tokens"]
            self._end(job, "completed", keep=True)
        except Exception as e:  # one request's failure must not stop the others
            job.sink(("error", 500, f"generation failed: {type(e).__name__}: {e}"))
            self._end(job, "failed", keep=False)

    def _prefill_chunk(self, job: Job) -> bool:
        """Run one prefill chunk of a prompt that needs more than one (True), so that a long prompt
        does not stall the other requests. generate_text then keeps these rows (the cached-prefix
        rule) and prefills only the last chunk."""
        ids = np.asarray(job.ids, dtype=np.int64)
        held = job.cache.shared_prefix(ids[:-1])
        size = prefill_chunk(self.backend, held)
        if len(ids) - held <= size:
            return False
        prefill(self.backend, job.cache, ids[: held + size])
        self.counts["prefill_tokens"] += size
        return True

    def _end(self, job: Job, outcome: str, keep: bool) -> None:
        job.run.close()
        with self._cond:
            self.running.remove(job)
            self.pool.release(job.cache, keep)
            self.counts[outcome] += 1

    def _shut_down(self) -> None:
        for job in list(self.waiting) + self.running:
            job.sink(("error", 503, "the server is shutting down"))
        for job in list(self.running):
            job.run.close()
            self.running.remove(job)
            self.pool.release(job.cache, keep=False)
        self.waiting.clear()
