"""Convert a SentencePiece BPE ``tokenizer.model`` into a ``tokenizers.Tokenizer``.

The device side only ships ``tokenizers``, so the export step turns MiniCPM4's SentencePiece model
into an equivalent ``tokenizer.json``. Two details make a Llama-style conversion silently disagree
with sentencepiece on this model:

1. No dummy prefix. MiniCPM4's normalizer has ``add_dummy_prefix: false``: sentencepiece does *not*
   prepend "▁" to the text. A converter that assumes the usual default (Metaspace prepending "▁")
   changes the first token of nearly every text. We read the flag from the proto and use
   ``prepend_scheme="never"`` (and no ``Strip`` in the decoder) when it is off.
2. User-defined pieces. About 1,086 pieces ("\\n", "\\t", "<table>", "...", "０", "<reserved_12>",
   ...) are USER_DEFINED: sentencepiece cuts them out of the text whole before BPE runs and never
   merges them with their neighbours. In ``tokenizers`` that is exactly what *added* tokens do, so
   each one becomes a non-special added token (it stays in decoded text). Left as plain vocab
   entries, BPE cannot build them ("x...y" would come out as "x", ".", ".", ".", "y" and "<table>"
   as "<", "table", ">"). CONTROL pieces (<unk>, <s>, </s>) become special added tokens.

BPE merges are not stored in the proto; they are derived from the vocab: every split of a piece
into two pieces that are both in the vocab, ranked by the merged piece's score (sentencepiece
always joins the adjacent pair whose merged piece scores highest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers

    import edgecpm.tokenizer

__all__ = ["convert_sentencepiece", "load_tokenizer"]


def load_tokenizer(folder: str | Path) -> edgecpm.tokenizer.Tokenizer:
    """The tokenizer of a checkpoint folder: its tokenizer.json, else its SentencePiece
    tokenizer.model converted here (with added_tokens.json). The export step and the torch backend
    use this; the device side reads tokenizer.json only (edgecpm.Tokenizer.from_pretrained)."""
    from edgecpm.errors import ConfigError
    from edgecpm.tokenizer import Tokenizer

    folder = Path(folder)
    model = folder / "tokenizer.model"
    if (folder / "tokenizer.json").exists() or not model.exists():
        return Tokenizer.from_pretrained(folder)
    added = folder / "added_tokens.json"
    try:
        added_tokens = json.loads(added.read_text(encoding="utf-8")) if added.exists() else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{added}: not valid JSON ({e})") from None
    return Tokenizer.from_tokenizer(convert_sentencepiece(model, added_tokens=added_tokens or None), folder)


def convert_sentencepiece(
    model_path: str | Path, added_tokens: dict[str, int] | None = None, add_bos: bool = True
) -> tokenizers.Tokenizer:
    """Build a ``tokenizers.Tokenizer`` that encodes and decodes like the SentencePiece model.

    ``added_tokens`` (the content of ``added_tokens.json``) adds special tokens at the given ids,
    which must continue the vocabulary. With ``add_bos`` the post-processor prepends the BOS piece
    (``encode(text).ids == [bos] + sp.encode(text)``); without it there is no post-processor.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError as e:  # optional dependency: only the export step needs it
        raise ImportError(
            "convert_sentencepiece needs sentencepiece and protobuf: pip install 'edgecpm[export]'"
        ) from e
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    _check_supported(proto, spm_pb2)
    piece_type = spm_pb2.ModelProto.SentencePiece

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    if len(vocab) != len(proto.pieces):
        raise ValueError(f"{model_path}: duplicate pieces in the vocabulary")
    has_unk = any(p.type == piece_type.UNKNOWN for p in proto.pieces)
    bpe = models.BPE(
        vocab,
        _merges(vocab, [p.score for p in proto.pieces]),
        # Only reached when a byte piece is missing (byte fallback comes first), as in sentencepiece.
        unk_token=proto.trainer_spec.unk_piece if has_unk else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(bpe)

    # Pitfall 1: honour add_dummy_prefix instead of assuming it.
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if dummy_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)

    # Pitfall 2: user-defined pieces are matched whole (added, not special); control pieces are special.
    kinds = {piece_type.CONTROL: True, piece_type.UNKNOWN: True, piece_type.USER_DEFINED: False}
    tok.add_tokens(
        [
            AddedToken(p.piece, special=kinds[p.type], normalized=False)
            for p in proto.pieces
            if p.type in kinds
        ]
    )
    _add_special_tokens(tok, added_tokens or {}, AddedToken)

    if add_bos:
        bos_id = proto.trainer_spec.bos_id
        if bos_id < 0:
            raise ValueError(f"{model_path}: add_bos=True but the model has no BOS piece")
        bos = proto.pieces[bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return tok


def _check_supported(proto, spm_pb2) -> None:
    """Refuse model features this converter does not reproduce, rather than convert them wrongly."""
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = []
    if trainer.model_type != spm_pb2.TrainerSpec.BPE:
        problems.append("model_type is not BPE")
    if norm.precompiled_charsmap or norm.normalization_rule_tsv:
        problems.append("a normalization rule / precompiled charsmap")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces")
    if not norm.escape_whitespaces or trainer.treat_whitespace_as_suffix:
        problems.append("whitespace not escaped as a '▁' prefix")
    if not trainer.byte_fallback:
        problems.append("no byte_fallback")
    if problems:
        raise NotImplementedError("unsupported SentencePiece model: " + ", ".join(problems))


def _merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of every piece into two vocab pieces, highest-scoring merged piece first.

    The sort is stable: equal scores keep piece-id order, and the splits of one piece keep
    left-to-right order (shortest left half first), as in the reference tokenizer.json.
    """
    ranked = []
    for piece, pid in vocab.items():  # id order
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((scores[pid], left, right))
    ranked.sort(key=lambda m: -m[0])
    return [(left, right) for _, left, right in ranked]


def _add_special_tokens(tok, added: dict[str, int], added_token_cls) -> None:
    """Add ``{content: id}`` as special tokens; the ids must already match or continue the vocabulary."""
    for content, want in sorted(added.items(), key=lambda kv: kv[1]):
        have = tok.token_to_id(content)
        if have is None and want != tok.get_vocab_size(with_added_tokens=True):
            raise ValueError(
                f"added token {content!r} wants id {want}, but the next free id is "
                f"{tok.get_vocab_size(with_added_tokens=True)}"
            )
        if have is not None and have != want:
            raise ValueError(f"added token {content!r} wants id {want}, but it already has id {have}")
        tok.add_special_tokens([added_token_cls(content, special=True, normalized=False)])
