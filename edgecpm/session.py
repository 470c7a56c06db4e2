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

import time
from pathlib import Path

import numpy as np

from edgecpm.bundle import is_bundle, load_bundle
from edgecpm.errors import BackendUnavailable, BudgetError, ConfigError
from edgecpm.generate import Generation, Timer, decode_tokens, prefill, speculative_tokens
from edgecpm.kv_cache import KVCache, parse_bytes
from edgecpm.sampling import Sampler, SamplingParams
from edgecpm.speculative import SpecConfig, is_eagle, make_drafter, make_eagle_drafter, open_draft_backend
from edgecpm.tokenizer import Tokenizer

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
SINK_TOKENS = 4  # kv_policy="window" keeps the first tokens (attention sinks, StreamingLLM)


def open_backend(path: Path, backend: str, dtype: str | None, threads: int | None, verify: bool = False):
    """auto: a checkpoint runs on torch; a bundle on TensorRT when it has an engine built for this
    GPU and TensorRT version, else on onnxruntime."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    bundle = is_bundle(path)
    if not bundle and not (path / "config.json").exists():
        raise ConfigError(f"{path}: neither an exported bundle (manifest.json) nor a checkpoint (config.json)")
    if backend == "auto" and not bundle:
        backend = "torch"
    if backend == "torch":
        if bundle:
            raise ConfigError(f"{path}: the torch backend runs Hugging Face checkpoints; this is a bundle "
                              f"(use backend='onnxruntime' or 'auto')")
        try:
            from edgecpm.runtimes.torch import TorchBackend
        except ImportError as e:
            raise BackendUnavailable(f"backend 'torch' needs torch ({e}); pip install 'edgecpm[export]'") from None
        return TorchBackend(str(path), dtype=dtype, threads=threads)
    if not bundle:
        raise ConfigError(f"{path}: backend {backend!r} runs exported bundles; export one first with "
                          f"`edgecpm export {path} -o BUNDLE`")
    b = load_bundle(path, verify=verify)
    if backend == "auto":  # an engine built for this GPU and TensorRT wins; onnxruntime otherwise
        backend = "onnxruntime"
        if b.manifest.get("engines"):
            from edgecpm.runtimes.tensorrt import usable_engine

            backend = "tensorrt" if usable_engine(b)[0] else "onnxruntime"
    if backend == "tensorrt":
        from edgecpm.runtimes.tensorrt import TensorRTBackend

        return TensorRTBackend(b, threads=threads, verify=verify)
    if dtype is not None and dtype != b.dtype:
        raise ConfigError(f"{path}: bundle was exported as {b.dtype}; dtype={dtype!r} needs a re-export")
    if backend == "onnxruntime":
        from edgecpm.runtimes.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(b, threads=threads)
    raise BackendUnavailable(f"backend {backend!r} is not available yet for {path}")


class Session:
    def __init__(self, path, backend: str = "auto", kv_budget: int | str = "1GiB", draft=None,
                 dtype: str | None = None, threads: int | None = None, kv_policy: str = "error"):
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: not a folder; pass a checkpoint or bundle folder")
        # A folder without tokenizer files (e.g. a bare test checkpoint) runs on token ids only.
        has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
        self._setup(open_backend(path, backend, dtype, threads), Tokenizer.from_pretrained(path) if has_tokenizer
                    else None, kv_budget, draft, threads, path, kv_policy)

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
        self._cached_ids: list[int] = []  # the token ids whose K/V the arena holds, in order
        spec = None if draft is None else draft if isinstance(draft, SpecConfig) else SpecConfig(draft=draft)
        if kv_policy == "window" and (spec or self.config.sparse):
            raise ConfigError(f"{path}: kv_policy='window' does not combine with "
                              f"{'speculative decoding' if spec else 'InfLLM v2 sparse attention'} yet; use 'error'")
        draft_backend = open_draft_backend(spec, backend, threads) if spec else None
        # One budget for both arenas: the draft's share is its bytes per token (+ room for a tree).
        per_token = self.config.kv_bytes_per_token(backend.kv_dtype.itemsize)
        draft_per_token = draft_backend.config.kv_bytes_per_token(draft_backend.kv_dtype.itemsize) if draft_backend else 0
        margin = spec.tree_size + 1 if draft_backend else 0
        capacity = min((self.kv_budget - margin * draft_per_token) // (per_token + draft_per_token),
                       self.config.max_position_embeddings)
        if capacity < 1:
            raise BudgetError(f"kv_budget of {self.kv_budget} bytes holds no token: this model needs {per_token} "
                              f"bytes per token of KV cache (+{draft_per_token} for the draft); raise kv_budget")
        self.cache = KVCache(self.config, capacity, backend.kv_dtype, kv_policy, SINK_TOKENS)
        if self.cache.window and capacity < 4 * SINK_TOKENS:
            raise BudgetError(f"kv_budget of {self.kv_budget} bytes holds {capacity} tokens: too few for "
                              f"kv_policy='window' (at least {4 * SINK_TOKENS}); raise kv_budget")
        if hasattr(backend, "on_keep"):
            self.cache.keep_hooks.append(backend.on_keep)
        self.drafter = None
        if spec and draft_backend and is_eagle(Path(spec.draft)):
            self.drafter = make_eagle_drafter(spec, draft_backend, capacity + margin, backend, self.cache)
        elif spec:
            draft_session = None
            if draft_backend:
                draft_session = Session.from_backend(draft_backend, (capacity + margin) * draft_per_token,
                                                     path=Path(spec.draft))
            self.drafter = make_drafter(spec, draft_session)

    # ---- public API ------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: list[str] | str | None = None, ignore_eos: bool = False) -> Generation:
        pieces = self._generate(prompt, max_new_tokens, SamplingParams(temperature, top_p, top_k,
                                repetition_penalty, seed), stop, ignore_eos)
        for _ in pieces:
            pass
        return pieces.result

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: list[str] | str | None = None, ignore_eos: bool = False):
        """Yield text pieces as they are generated (never half a UTF-8 character). The finished
        Generation is available afterwards as `s.last`."""
        pieces = self._generate(prompt, max_new_tokens, SamplingParams(temperature, top_p, top_k,
                                repetition_penalty, seed), stop, ignore_eos)
        yield from pieces

    def chat(self, system: str | None = None) -> Chat:
        if self.tokenizer is None:
            raise ConfigError(f"{self.path}: chat needs tokenizer files (tokenizer.json + tokenizer_config.json)")
        return Chat(self, system)

    def logits(self, token_ids) -> np.ndarray:
        """Full-sequence logits [T, V] float32 from a fresh context."""
        ids = self._encode(list(token_ids))
        self._reset()
        out = prefill(self.backend, self.cache, ids, all_logits=True)
        self._cached_ids = ids
        return out

    def memory(self) -> dict:
        c = self.cache
        # A model drafter or EAGLE head: its weights count, and its arena shares the budget.
        draft_backend, draft_cache = getattr(self.drafter, "backend", None), getattr(self.drafter, "cache", None)
        return {
            "weights_bytes": self.backend.weight_bytes + (draft_backend.weight_bytes if draft_backend else 0),
            "kv_budget_bytes": self.kv_budget,
            "draft_kv_allocated_bytes": draft_cache.bytes_allocated if draft_cache else 0,
            "kv_bytes_per_token": c.bytes_per_token,
            "kv_capacity_tokens": c.capacity,
            "kv_allocated_bytes": c.bytes_allocated,
            "kv_used_bytes": c.bytes_in_use,
            "kv_used_tokens": c.length,
            "kv_peak_bytes": c.peak_length * c.bytes_per_token,
        }

    # ---- internals -----------------------------------------------------------------------
    def _reset(self):
        self.cache.truncate(0)
        self._cached_ids = []

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.path}: no tokenizer.json/tokenizer.model, so prompts must be token id lists")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if not ids or bad:
            raise ValueError(f"prompt token ids must be a non-empty list in [0, {self.config.vocab_size}); got {bad[:5]}")
        return ids

    def _prefill_reusing_cache(self, ids: list[int], timer: Timer) -> np.ndarray:
        """Keep the longest cached prefix of `ids` (at least one token is always run, for logits)."""
        c = self.cache
        max_pos = self.config.max_position_embeddings
        if len(ids) > max_pos:
            raise BudgetError(f"prompt has {len(ids)} tokens but the model's max_position_embeddings is "
                              f"{max_pos}; shorten the prompt")
        if len(ids) > c.capacity and not c.window:  # the window policy streams a long prompt through
            raise BudgetError(
                f"prompt has {len(ids)} tokens but kv_budget={self.kv_budget} bytes holds {c.capacity} tokens "
                f"({c.bytes_per_token} bytes per token); raise kv_budget or shorten the prompt"
            )
        # Length of the common prefix, compared in numpy (a drafter calls this every step).
        limit = min(len(self._cached_ids), len(ids) - 1)
        differ = np.flatnonzero(np.asarray(self._cached_ids[:limit]) != np.asarray(ids[:limit]))
        keep = int(differ[0]) if len(differ) else limit
        if hasattr(self.drafter, "first_needed_row"):  # an EAGLE head reads the target's features of these rows
            keep = min(keep, self.drafter.first_needed_row(ids))
        if not c.evicted:  # rows and ids correspond one to one
            c.truncate(keep)
        elif keep < len(self._cached_ids):  # the window dropped rows: only a continuation reuses them
            keep = 0
            c.truncate(0)
        self._cached_ids = self._cached_ids[:keep]
        logits = prefill(self.backend, self.cache, ids[keep:], timer=timer)
        self._cached_ids = list(ids)
        return logits

    def _generate(self, prompt, max_new_tokens, params, stop, ignore_eos):
        return _TextStream(self, self._encode(prompt), max_new_tokens, params, stop, ignore_eos)


class _TextStream:
    """Iterates text pieces of one generation; `.result` holds the Generation at the end.

    Stop strings: text that could still become the start of a stop string is held back, so a
    streamed stop string is never shown; the text ends right before it.
    """

    def __init__(self, session: Session, ids, max_new_tokens, params, stop, ignore_eos):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
        self.s, self.ids, self.max_new, self.params = session, ids, max_new_tokens, params
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise ValueError(f"stop={stop!r}: must be non-empty strings")
        self.eos = set() if ignore_eos else session.eos_ids
        self.result: Generation | None = None

    def __iter__(self):
        s = self.s
        timer = Timer()
        t0 = time.perf_counter()
        logits = s._prefill_reusing_cache(self.ids, timer)
        sampler = Sampler(self.params, s.config.vocab_size, self.ids)
        if s.drafter is None:
            tokens = decode_tokens(s.backend, s.cache, logits, sampler, self.max_new, self.eos, timer)
        else:
            tokens = speculative_tokens(s.backend, s.cache, logits, sampler, self.max_new, self.eos, timer,
                                        s.drafter, list(self.ids))
        detok = s.tokenizer.stream_decoder() if s.tokenizer else None
        out_ids: list[int] = []
        text, shown = "", 0
        hold = max((len(x) for x in self.stop), default=1) - 1
        finish = None
        while True:
            try:
                token = next(tokens)
            except StopIteration as end:
                finish = end.value
                break
            out_ids.append(token)
            # The cache holds a prefix of prompt + output: record the tokens it gained.
            if s.cache.position > len(s._cached_ids):
                done = len(s._cached_ids) - len(self.ids)
                s._cached_ids.extend(out_ids[done : s.cache.position - len(self.ids)])
            if token in self.eos:
                continue
            text += detok.add(token) if detok else ""
            cut = self._find_stop(text, shown)
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            safe = len(text) - hold if self.stop else len(text)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
        tokens.close()
        if detok and finish != "stop":
            text += detok.flush()
        if shown < len(text):
            yield text[shown:]
        timer_stats = timer.as_stats(s.cache)
        timer_stats["total_s"] = time.perf_counter() - t0
        gen_ids = [t for t in out_ids if t not in self.eos] if finish == "eos" else out_ids
        self.result = Generation(text, gen_ids, finish, timer_stats)
        s.last = self.result

    def _find_stop(self, text: str, shown: int) -> int | None:
        start = max(0, shown - max((len(x) for x in self.stop), default=0))
        hits = [i for i in (text.find(x, start) for x in self.stop) if i >= 0]
        return min(hits) if hits else None


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
        pieces = self.stream(content, **kwargs)
        for _ in pieces:
            pass
        return self.session.last

    def stream(self, content: str, **kwargs):
        s = self.session
        prompt = self.ids + self._turn_ids(content)
        yield from s.stream(prompt, **kwargs)
        g = s.last
        self.messages += [{"role": "user", "content": content}, {"role": "assistant", "content": g.text}]
        # The reply's ids as generated (re-encoded when a stop string cut the text, so the model
        # never sees what the user did not), closed the way the template closes a message. The
        # next turn reuses the cache up to the first difference.
        reply = s.tokenizer.encode(g.text, add_bos=False) if g.finish_reason == "stop" else g.token_ids
        end = s.tokenizer.encode("<|im_end|>\n", add_bos=False)
        self.ids = prompt + reply + end
