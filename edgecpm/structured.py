"""Structured output: token masks that keep a generation inside a JSON schema.

    c = JsonConstraint(tokenizer, {"type": "object", ...}, vocab_size, eos_ids)
    allowed = c.allowed()        # bool [vocab_size]: the tokens that keep the output a valid prefix
    c.advance(token)             # after the sampler picked one of them

The grammar work is llguidance's (a maintained library, `pip install 'edgecpm[serve]'`), built
from the model's own tokenizer.json; the sampler applies the mask (edgecpm.sampling). Once the JSON
is complete only EOS is allowed, so a constrained generation that ends with "eos" always parses and
validates; one that runs out of max_new_tokens ends with "length" and may be cut short.

Whitespace between JSON tokens is not allowed: a model that would rather write code would
otherwise fill the output with newlines and indentation.
"""

from __future__ import annotations

import weakref

import numpy as np

from edgecpm.errors import BackendUnavailable

# The llguidance tokenizer of each Tokenizer (building one walks the whole vocabulary).
_ll_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise BackendUnavailable(f"structured output needs llguidance ({e}); pip install 'edgecpm[serve]'") from None
    return llguidance


def _ll_tokenizer(llg, tokenizer, vocab_size: int, eos_ids):
    key = (vocab_size, tuple(sorted(eos_ids)))
    per_tokenizer = _ll_tokenizers.setdefault(tokenizer, {})
    if key not in per_tokenizer:
        # tokenizer.json's text, as the tokenizer holds it (edgecpm.Tokenizer keeps no path).
        per_tokenizer[key] = llg.LLTokenizer(tokenizer._tok.to_str(), n_vocab=vocab_size, eos_token=sorted(eos_ids))
    return per_tokenizer[key]


class JsonConstraint:
    """The JSON documents a schema allows ({"type": "object"} for any object), one token at a time."""

    def __init__(self, tokenizer, schema: dict | str, vocab_size: int, eos_ids):
        if tokenizer is None:
            raise ValueError("json_schema needs the model's tokenizer files (tokenizer.json)")
        if not eos_ids:
            raise ValueError("json_schema needs an EOS token to end the document (not with ignore_eos)")
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise ValueError(f"json_schema: {e}") from None
        self.matcher = llg.LLMatcher(_ll_tokenizer(llg, tokenizer, vocab_size, eos_ids), grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"json_schema: {self.matcher.get_error()}")
        self.vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"structured output: token {token} is outside the grammar "
                               f"({self.matcher.get_error()})")

