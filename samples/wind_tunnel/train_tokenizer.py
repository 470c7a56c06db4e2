"""Train the wind-tunnel BPE tokenizer (vocab 8192, byte fallback, MiniCPM4-style special tokens).

Layout of the vocabulary (ids):
    0 <unk>   1 <s> (BOS)   2 </s>   3 <|im_end|>   4 <|im_start|>
    5..260    <0x00>..<0xFF>  byte-fallback pieces: any character outside the learned alphabet
              is spelled as its UTF-8 bytes, so every input encodes (as in MiniCPM4's tokenizer)
    261..     learned alphabet and BPE merges

Pre-tokenization: a GPT-2-like regex split tuned for code (identifiers keep `_` and digits, a run of
spaces gives all but its last space to the run, so "\\n    return" -> "\\n   " + " return"), then
SentencePiece-style Metaspace (" " -> "▁", nothing prepended). The decoder only maps "▁" back to a
space, applies byte fallback and fuses: no Strip step, so decoding any suffix of ids gives exactly
the suffix of the text. Caveat: a literal "▁" (U+2581) in the input decodes as a space, as in any
Metaspace tokenizer; the standard library never contains one.

Usage: python samples/wind_tunnel/train_tokenizer.py [--out ~/.cache/edgecpm/wind_tunnel]
Reads OUT/corpus/*.txt, writes OUT/tokenizer/{tokenizer.json,tokenizer_config.json,generation_config.json}.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # shared 2-core machine; set before tokenizers starts

from make_corpus import DEFAULT_OUT, DOC_SEPARATOR
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]
# The most frequent characters of train.txt form the base alphabet; rarer ones use byte fallback.
ALPHABET_SIZE = 160
CODE_SPLIT = r" ?[\p{L}_][\p{L}\p{N}_]*| ?\p{N}+| ?[^\s\p{L}\p{N}_]+|\s+(?!\S)|\s+"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def configure_pipeline(tok: Tokenizer) -> None:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CODE_SPLIT), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),
    ])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])


def base_alphabet(docs: list[str]) -> list[str]:
    """Top ALPHABET_SIZE characters by count, ties broken by code point. Chosen here because the
    trainer's own limit_alphabet breaks ties in hash order, which made reruns differ."""
    counts = Counter()
    for doc in docs:
        counts.update(doc.replace(" ", "▁"))  # the trainer sees text after Metaspace
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [ch for ch, _ in ranked[:ALPHABET_SIZE]]


def learn_merges(docs: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Plain BPE over the pre-tokenized training text; returns its vocab and ordered merges."""
    tok = Tokenizer(models.BPE())
    configure_pipeline(tok)
    alphabet = base_alphabet(docs)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS) - len(BYTE_PIECES),
        min_frequency=2,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def assemble_tokenizer(learned_vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """Specials, then byte pieces, then the learned pieces in their learned order."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + BYTE_PIECES)}
    for piece, _ in sorted(learned_vocab.items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    bpe = models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    configure_pipeline(tok)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # For Hugging Face users; edgecpm adds BOS itself and bypasses the post-processor.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert tok.get_vocab_size(with_added_tokens=True) <= VOCAB_SIZE, tok.get_vocab_size()
    return tok


def check_round_trip(tok: Tokenizer, docs: list[str]) -> int:
    """decode(encode(x)) == x for every held-out document, and every suffix of ids decodes to the
    matching suffix of the text (checked at 200 cut points per document). Returns the token count."""
    n_tokens = 0
    for doc in docs:
        ids = tok.encode(doc, add_special_tokens=False).ids
        n_tokens += len(ids)
        if tok.decode(ids, skip_special_tokens=False) != doc:
            raise SystemExit("round trip failed on a held-out document")
        step = max(1, len(ids) // 200)
        for cut in range(0, len(ids), step):
            prefix = tok.decode(ids[:cut], skip_special_tokens=False)
            suffix = tok.decode(ids[cut:], skip_special_tokens=False)
            # A cut inside a byte-fallback character cannot decode cleanly; skip those cuts.
            if "\ufffd" not in prefix + suffix and prefix + suffix != doc:
                raise SystemExit(f"suffix decode inconsistent at token {cut}")
    return n_tokens


def write_tokenizer_files(tok: Tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    im_end = tok.token_to_id("<|im_end|>")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "additional_special_tokens": ["<|im_end|>", "<|im_start|>"],
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": [2, im_end], "pad_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache folder (default: {DEFAULT_OUT})")
    args = ap.parse_args()
    root = args.out.expanduser()
    train_docs = (root / "corpus/train.txt").read_text(encoding="utf-8").split(DOC_SEPARATOR)
    heldout_docs = (root / "corpus/heldout.txt").read_text(encoding="utf-8").split(DOC_SEPARATOR)

    tok = assemble_tokenizer(*learn_merges(train_docs))
    n_tokens = check_round_trip(tok, heldout_docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in heldout_docs)
    write_tokenizer_files(tok, root / "tokenizer")
    print(f"vocab {tok.get_vocab_size(with_added_tokens=True)}; held-out round trip exact; "
          f"{n_tokens} held-out tokens, {n_bytes / n_tokens:.2f} bytes/token -> {root / 'tokenizer'}")


if __name__ == "__main__":
    main()
