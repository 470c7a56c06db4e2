"""Tokenizer on the `tokenizers` library, the model's own chat template, UTF-8-safe streaming.

Files read from a checkpoint or bundle folder:
- tokenizer.json (a checkpoint with only a SentencePiece tokenizer.model is converted by the
  export step, which writes tokenizer.json into the bundle, or by the torch backend's
  `edgecpm.runtimes.torch.load_tokenizer`; the device side never converts)
- tokenizer_config.json: add_bos_token, bos_token, chat_template
- generation_config.json / config.json: EOS ids (MiniCPM4: 2 and 73440)
"""

from __future__ import annotations

import json
import operator
from pathlib import Path

import jinja2
from tokenizers import Tokenizer as HFTokenizer

from edgecpm.errors import ConfigError

# ChatML, used when a folder ships no template (MiniCPM4's own template is exactly this).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _token_content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict, eos_token_ids: list[int]):
        self._tok = tokenizer
        self.config = config
        self.add_bos_token = bool(config.get("add_bos_token", True))
        bos = _token_content(config.get("bos_token")) or "<s>"
        self.bos_token_id = tokenizer.token_to_id(bos)
        self.chat_template = config.get("chat_template") or CHATML_TEMPLATE
        self._template = jinja2.Environment(trim_blocks=False).from_string(self.chat_template)
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a bundle or checkpoint folder holding tokenizer.json."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if tj.exists():
            return cls.from_tokenizer(HFTokenizer.from_file(str(tj)), path)
        if (path / "tokenizer.model").exists():
            raise ConfigError(
                f"{path}: only a SentencePiece tokenizer.model, no tokenizer.json, and the device side does not "
                f"convert it; export the checkpoint (`edgecpm export {path} -o BUNDLE`: bundles always carry "
                f"tokenizer.json) or run it with backend='torch' (needs the export extra)"
            )
        raise ConfigError(f"{path}: no tokenizer.json or tokenizer.model; copy the checkpoint's tokenizer files")

    @classmethod
    def from_tokenizer(cls, tok: HFTokenizer, path: str | Path) -> Tokenizer:
        """A Tokenizer around `tok`, with the chat template, BOS and EOS ids read from the folder's
        tokenizer_config.json, generation_config.json and config.json."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")
        eos: list[int] = []
        for src in (model_cfg, gen):
            e = src.get("eos_token_id")
            if e is not None:
                eos += e if isinstance(e, list) else [e]
        eos_tok = _token_content(config.get("eos_token"))
        if eos_tok and tok.token_to_id(eos_tok) is not None:
            eos.append(tok.token_to_id(eos_tok))
        return cls(tok, config, eos)

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (with EOS ids) into a bundle folder."""
        folder = Path(folder)
        self._tok.save(str(folder / "tokenizer.json"))
        cfg = {**self.config, "chat_template": self.chat_template, "add_bos_token": self.add_bos_token}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False))
        gen = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_ids}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=1))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # The post-processor is bypassed so BOS follows add_bos/add_bos_token alone.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of many texts at once (no BOS), encoded in parallel by the tokenizers library."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    @property
    def special_ids(self) -> list[int]:
        """Ids of the special tokens (BOS, EOS, ChatML markers, ...)."""
        return sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of token ids (a list, or any iterable of ints such as a numpy array).

        skip_special_tokens: leave out BOS, EOS and the ChatML markers (the default, as the text of a
        generation does), so `decode(encode(text)) == text` though encode adds BOS. Pass False to
        see them (`<s>`, `<|im_end|>`, ...). Ids outside [0, vocab_size) are a ValueError."""
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise ValueError(f"decode: expects a list of integer token ids, got {str(ids)[:80]}") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: token ids {bad[:8]} lie outside the tokenizer's vocabulary "
                             f"[0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.decode([self.bos_token_id], skip_special_tokens=False)
                                     if self.bos_token_id is not None else "")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            add_bos: bool = True) -> list[int]:
        """ChatML ids with BOS prepended (unless the template already emits it)."""
        text = self.render_chat(messages, add_generation_prompt)
        ids = self.encode(text, add_bos=False)
        if add_bos and self.add_bos_token and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenization that never emits half a UTF-8 character.

    Byte-fallback pieces (<0xE4><0xBD><0xA0>) decode to U+FFFD until the character is complete, so
    text is emitted only when the decoded tail does not end in U+FFFD. Decoding a short window of
    ids (from `prefix` on) keeps each step O(1) instead of re-decoding the whole output.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids before this are fully emitted and no longer decoded
        self.read = 0  # ids before this have had their text emitted

    def add(self, token_id: int) -> str:
        # The model's ids, decoded by the library directly: a vocabulary padded past the tokenizer's
        # (Session allows it) yields ids the tokenizer has no text for, which decode to nothing.
        self.ids.append(int(token_id))
        window = self.tok._tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if window.endswith("\ufffd"):
            return ""
        emitted = self.tok._tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        self.prefix, self.read = self.read, len(self.ids)
        return window[len(emitted) :]

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character decodes to U+FFFD)."""
        window = self.tok._tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        emitted = self.tok._tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return window[len(emitted) :]
