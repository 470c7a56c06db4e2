"""`edgecpm.Session`: the one object an application holds.

    s = edgecpm.Session("bundle/", kv_budget="512MiB")
    g = s.generate("Hello", max_new_tokens=32)
    for piece in s.stream("Hello"): print(piece, end="")
    chat = s.chat(system="Be brief."); chat.send("hi").text

A session holds one backend, one tokenizer and one KV arena. The arena remembers which token ids
it holds; every request reuses the longest cached prefix of its prompt and prefills only the rest.
That single rule makes chat turns append to the cache (no re-prefill of the history) and keeps
every result identical to a fresh context.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgecpm.backends import open_backend, open_draft_backend, open_tokenizer
from edgecpm.drafters import EagleDrafter, ModelDrafter, NgramDrafter, SpecConfig, default_spec, is_eagle
from edgecpm.errors import BudgetError, ConfigError
from edgecpm.frspec import frspec_map
from edgecpm.generate import Generation, generate_text, prefill
from edgecpm.kv_cache import KVCache, parse_bytes
from edgecpm.sampling import SamplingParams
from edgecpm.tokenizer import Tokenizer

SINK_TOKENS = 4  # kv_policy="window" keeps the first tokens (attention sinks, StreamingLLM)


class Session:
    def __init__(self, path, backend: str = "auto", kv_budget: int | str = "1GiB", draft=None,
                 dtype: str | None = None, threads: int | None = None, kv_policy: str = "error",
                 verify: bool = False, device: str | None = None):
        """verify: re-hash every file of a bundle against its manifest before loading (bit rot,
        a bad copy); otherwise sizes are checked always and hashes on the first load after a copy.
        device: the torch backend's device ("cuda": the KV cache on the GPU, fp16 by default;
        runtimes/torch.py); other backends choose their own."""
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: not a folder; pass a checkpoint or bundle folder")
        runner = open_backend(path, backend, dtype, threads, verify=verify, device=device)
        self._setup(runner, open_tokenizer(path, runner), kv_budget, draft, threads, path, kv_policy)

    @classmethod
    def from_backend(cls, backend, kv_budget: int | str = "1GiB", tokenizer: Tokenizer | None = None, draft=None,
                     path: Path | None = None, kv_policy: str = "error") -> Session:
        """A session over a backend object you built yourself (anything with the runtimes.Backend protocol)."""
        s = cls.__new__(cls)
        s._setup(backend, tokenizer, kv_budget, draft, None, path, kv_policy)
        return s

    def _setup(self, backend, tokenizer, kv_budget, draft, threads, path, kv_policy="error"):
        self.path, self.backend, self.tokenizer = path, backend, tokenizer
        self.config = backend.config
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise ConfigError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                              f"{self.config.vocab_size}; the tokenizer files belong to another model")
        self.kv_budget = parse_bytes(kv_budget)
        self.eos_ids = set(self.config.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self.last: Generation | None = None  # the most recent finished generation (after stream())
        # Requests are serialized: a Session may be shared by threads (see _exclusive).
        self._lock = threading.Lock()
        self._holder: tuple[int, object] | None = None  # (thread id, its open stream) while one runs
        if draft is None or isinstance(draft, SpecConfig):
            spec = draft
        elif isinstance(draft, (str, Path)):  # "ngram" or a folder: the measured settings for it
            spec = default_spec(backend.config, draft, eagle=draft != "ngram" and is_eagle(Path(draft)))
        else:  # the caller's own drafter object
            spec = SpecConfig(draft=draft)
        if kv_policy == "window" and (spec or self.config.sparse):
            raise ConfigError(f"{path}: kv_policy='window' does not combine with "
                              f"{'speculative decoding' if spec else 'InfLLM v2 sparse attention'} yet; use 'error'")
        names_model = spec is not None and isinstance(spec.draft, (str, Path)) and spec.draft != "ngram"
        self.draft_backend = open_draft_backend(spec.draft, backend, threads) if names_model else None
        # One budget for both arenas: the draft's share is its bytes per token (+ room for a tree).
        per_token = self.config.kv_bytes_per_token(backend.kv_dtype.itemsize)
        draft_per_token = 0
        if self.draft_backend:
            draft_per_token = self.draft_backend.config.kv_bytes_per_token(self.draft_backend.kv_dtype.itemsize)
        margin = spec.tree_size + 1 if self.draft_backend else 0
        capacity = min((self.kv_budget - margin * draft_per_token) // (per_token + draft_per_token),
                       self.config.max_position_embeddings)
        if capacity < 1:
            raise BudgetError(f"kv_budget of {self.kv_budget} bytes holds no token: this model needs {per_token} "
                              f"bytes per token of KV cache (+{draft_per_token} for the draft); raise kv_budget")
        self.cache = KVCache(self.config, capacity, backend.kv_dtype, kv_policy, SINK_TOKENS)
        if self.cache.window and capacity < 4 * SINK_TOKENS:
            raise BudgetError(f"kv_budget of {self.kv_budget} bytes holds {capacity} tokens: too few for "
                              f"kv_policy='window' (at least {4 * SINK_TOKENS}); raise kv_budget")
        self.cache.keep_hooks.append(backend.on_keep)
        self.draft_cache = None
        if self.draft_backend:
            cfg = self.draft_backend.config
            self.draft_cache = KVCache(cfg, min(capacity + margin, cfg.max_position_embeddings),
                                       self.draft_backend.kv_dtype)
        self.spec = spec  # the speculative settings in use (None: plain decoding)
        self.drafter = self._make_drafter(spec, names_model)

    def _make_drafter(self, spec: SpecConfig | None, names_model: bool):
        if spec is None:
            return None
        if not names_model:
            if spec.draft != "ngram":
                return spec.draft  # the caller's own drafter
            drafter = NgramDrafter(spec)
            if drafter.table is not None and drafter.table.vocab_size > self.config.vocab_size:
                # (a tokenizer's vocabulary may be smaller than the model's padded one: that is fine)
                raise ConfigError(f"{spec.corpus}: the n-gram table was built for a vocabulary of "
                                  f"{drafter.table.vocab_size} tokens, the model has {self.config.vocab_size}")
            return drafter
        id_map = frspec_map(self.draft_backend)
        if is_eagle(Path(spec.draft)):
            return EagleDrafter(self.draft_backend, self.draft_cache, self.backend, self.cache, spec, id_map)
        return ModelDrafter(self.draft_backend, self.draft_cache, spec, id_map)

    # ---- public API ------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: list[str] | str | None = None, ignore_eos: bool = False,
                 json_schema: dict | str | None = None) -> Generation:
        """json_schema: the output is JSON valid under this schema ({"type": "object"}: any JSON
        object) when it ends with finish_reason "eos"; decodes without the drafter (needs the
        serve extra: llguidance)."""
        run = self._request(self._encode(prompt), max_new_tokens, SamplingParams(
            temperature, top_p, top_k, repetition_penalty, seed), stop, ignore_eos, json_schema)
        return drain(self._serve(run))

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: list[str] | str | None = None, ignore_eos: bool = False, json_schema: dict | str | None = None):
        """Yield text pieces as they are generated (never half a UTF-8 character). The finished
        Generation is available afterwards as `s.last`."""
        run = self._request(self._encode(prompt), max_new_tokens, SamplingParams(
            temperature, top_p, top_k, repetition_penalty, seed), stop, ignore_eos, json_schema)
        return self._serve(run)

    def chat(self, system: str | None = None) -> Chat:
        if self.tokenizer is None:
            raise ConfigError(f"{self.path}: chat needs tokenizer files (tokenizer.json + tokenizer_config.json)")
        return Chat(self, system)

    def logits(self, token_ids) -> np.ndarray:
        """Full-sequence logits [T, V] float32 from a fresh context."""
        ids = self._encode(list(token_ids))
        with self._exclusive(None):
            self.cache.truncate(0)
            return prefill(self.backend, self.cache, ids, all_logits=True)

    def reset(self) -> None:
        """Forget the cached context: the next request prefills its whole prompt."""
        with self._exclusive(None):
            self.cache.truncate(0)

    def memory(self) -> dict:
        c, dc = self.cache, self.draft_cache
        # A model drafter or EAGLE head: its weights count, and its arena shares the budget.
        return {
            "weights_bytes": self.backend.weight_bytes + (self.draft_backend.weight_bytes if self.draft_backend else 0),
            "kv_budget_bytes": self.kv_budget,
            "draft_kv_allocated_bytes": dc.bytes_allocated if dc else 0,
            "kv_bytes_per_token": c.bytes_per_token,
            "kv_capacity_tokens": c.capacity,
            "kv_allocated_bytes": c.bytes_allocated,
            "kv_used_bytes": c.bytes_in_use,
            "kv_used_tokens": c.length,
            "kv_peak_bytes": c.peak_length * c.bytes_per_token,
        }

    # ---- internals -----------------------------------------------------------------------
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.path}: no tokenizer.json/tokenizer.model, so prompts must be token id lists")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if not ids or bad:
            raise ValueError(f"prompt token ids must be a non-empty list in [0, {self.config.vocab_size}); "
                             f"got {bad[:5]}")
        return ids

    def _request(self, ids: list[int], max_new_tokens, params: SamplingParams, stop, ignore_eos, json_schema=None):
        """Check a request's arguments now; return the generator function that runs it."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(x, str) or not x for x in stops):
            raise ValueError(f"stop={stop!r}: must be non-empty strings")
        eos = set() if ignore_eos else self.eos_ids
        constraint = None
        if json_schema is not None:
            from edgecpm.structured import JsonConstraint  # llguidance, only when asked for

            constraint = JsonConstraint(self.tokenizer, json_schema, self.config.vocab_size, eos)
        # An EAGLE head reads the target's features of the rows it has not seen: keep those rows
        # in the cache's reusable prefix only while it still has them.
        reuse_limit = self.drafter.first_needed_row if isinstance(self.drafter, EagleDrafter) else None
        return lambda: generate_text(self.backend, self.cache, self.tokenizer, ids, max_new_tokens, params, stops,
                                     eos, self.drafter, reuse_limit, constraint)

    def _serve(self, run):
        """The pieces of one request, holding the session while it runs; sets `last` at the end."""
        def pieces():
            with self._exclusive(me):
                g = yield from run()
            self.last = g
            return g

        stream = pieces()
        # A weak reference: a stream the caller drops (`break`) is closed at once, which releases
        # the session (a strong one would make a cycle that waits for the garbage collector).
        me = weakref.ref(stream)
        return stream

    @contextmanager
    def _exclusive(self, stream):
        """Requests take turns: another thread waits until this one's request ends. A new request
        on the thread of an unfinished stream ends that stream (it yields nothing more); the cache
        stays consistent either way, since it always holds the ids of the rows it holds."""
        holder = self._holder
        if holder is not None and holder[0] == threading.get_ident() and holder[1] is not None:
            unfinished = holder[1]()
            if unfinished is not None:
                unfinished.close()
        self._lock.acquire()
        self._holder = (threading.get_ident(), stream)
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()


def drain(pieces) -> Generation:
    """Run a stream of pieces to its end; its return value, the Generation."""
    while True:
        try:
            next(pieces)
        except StopIteration as end:
            return end.value


class Chat:
    """A multi-turn conversation. Each turn appends to the session's KV cache: only the new
    turn's tokens are prefilled. The history is kept as token ids (what the model saw)."""

    def __init__(self, session: Session, system: str | None = None):
        self.session = session
        tok = session.tokenizer
        self.messages: list[dict] = []
        self.ids: list[int] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.ids = tok.apply_chat_template(self.messages, add_generation_prompt=False) if system else (
            [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else [])

    def _turn_ids(self, content: str) -> list[int]:
        return self.session.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                          add_generation_prompt=True, add_bos=False)

    def send(self, content: str, **kwargs) -> Generation:
        return drain(self.stream(content, **kwargs))

    def stream(self, content: str, **kwargs):
        """Yield the reply's text pieces; the generator returns the Generation."""
        s = self.session
        prompt = self.ids + self._turn_ids(content)
        g = yield from s.stream(prompt, **kwargs)
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": g.text}]
        # The reply's ids as generated (re-encoded when a stop string cut the text, so the model
        # never sees what the user did not), closed the way the template closes a message. The
        # next turn reuses the cache up to the first difference.
        reply = s.tokenizer.encode(g.text, add_bos=False) if g.finish_reason == "stop" else g.token_ids
        end = s.tokenizer.encode("<|im_end|>\n", add_bos=False)
        self.ids = prompt + reply + end
        return g
