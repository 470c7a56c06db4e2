"""OpenAI chat messages -> the token ids Session.chat gives the model for the same conversation.

Session.chat starts with the system message (or BOS), adds each user turn with the template's
generation prompt, and appends each reply as the ids the model generated, closed by
"<|im_end|>\\n". A client sends the reply back as text, and text re-encoded can differ from the
ids that were generated; so the server remembers the ids of the replies it gave (by a hash of the
conversation up to and including the reply) and uses them when a conversation continues. The
answer then equals Chat.send's, and the continuation shares its whole history with the cache the
previous turn left (no re-prefill).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import numpy as np

ROLES = ("system", "user", "assistant")
REPLY_TOKENS_KEPT = 4 << 20  # ids of remembered conversations, at most (int32: 16 MiB)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ValueError("message content must be a string or a list of {'type': 'text', 'text': ...} parts")


def normalize(messages) -> list[dict]:
    """[{"role", "content"}] with text content; ValueError for anything else."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"each message needs a role in {ROLES}; got {str(m)[:80]}")
        out.append({"role": m["role"], "content": _text(m.get("content") or "")})
    return out


def _key(messages: list[dict]) -> bytes:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).digest()


class ChatPrompts:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.end = tokenizer.encode("<|im_end|>\n", add_bos=False)
        self.generation_prompt = tokenizer.apply_chat_template([], add_generation_prompt=True, add_bos=False)
        self.replies: OrderedDict[bytes, np.ndarray] = OrderedDict()  # least recently used first
        self.tokens_kept = 0

    def ids(self, messages: list[dict]) -> list[int]:
        """The prompt ids for normalized `messages`, ending in the assistant's generation prompt."""
        for k in range(len(messages), 0, -1):
            key = _key(messages[:k]) if messages[k - 1]["role"] == "assistant" else None
            if key in self.replies:
                self.replies.move_to_end(key)
                return self.replies[key].tolist() + self._turns(messages[k:])
        tok = self.tok
        if messages[0]["role"] == "system":
            ids = tok.apply_chat_template(messages[:1], add_generation_prompt=False)
            return ids + self._turns(messages[1:])
        bos = [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else []
        return bos + self._turns(messages)

    def remember(self, messages: list[dict], prompt_ids: list[int], generation) -> None:
        """Keep the ids of a finished reply (as Chat does) for the conversation's next turn."""
        g = generation
        reply = self.tok.encode(g.text, add_bos=False) if g.finish_reason == "stop" else g.token_ids
        key = _key([*messages, {"role": "assistant", "content": g.text}])
        self._forget(key)
        self.replies[key] = np.asarray(prompt_ids + reply + self.end, dtype=np.int32)
        self.tokens_kept += len(self.replies[key])
        while self.tokens_kept > REPLY_TOKENS_KEPT:
            self._forget(next(iter(self.replies)))

    def _forget(self, key: bytes) -> None:
        if key in self.replies:
            self.tokens_kept -= len(self.replies.pop(key))

    def _turns(self, messages: list[dict]) -> list[int]:
        """Ids of `messages` after a history (which ends with a closed message), then the
        generation prompt of the reply wanted."""
        ids: list[int] = []
        opened = False  # the ids end in a generation prompt
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                ids += ([] if opened else self.generation_prompt) + self.tok.encode(m["content"], add_bos=False)
                ids += self.end
                opened = False
                continue
            # A message the assistant answers next carries the generation prompt, as in Chat.
            opened = i + 1 == len(messages) or messages[i + 1]["role"] == "assistant"
            ids += self.tok.apply_chat_template([m], add_generation_prompt=opened, add_bos=False)
        return ids if opened else ids + self.generation_prompt
