"""Held-out prompts the wind-tunnel models never saw: slices of a third-party package's sources.

The models were trained on the CPython standard library only (make_corpus.py), so code from a
package outside it is held out by construction. Default: `rich` (pure Python, installed with
edgecpm). Files are read in sorted path order; files under 4000 characters and data tables (fewer
than one `def ` per 150 lines: rich's emoji, palette and unicode tables, which would flatter any
copying drafter) are skipped; `n` of them
are picked with numpy's default_rng(seed); each prompt is `n_tokens` tokens starting at the first
line break after the file's middle (the start of a file is mostly imports and licence text).

    python samples/wind_tunnel/heldout_prompts.py            # prints the picked files and slices
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parent


def package_files(package: str) -> list[Path]:
    root = Path(importlib.import_module(package).__file__).parent
    return sorted(f for f in root.rglob("*.py") if "__pycache__" not in f.parts)


def is_code(text: str) -> bool:
    return len(text) >= 4000 and text.count("def ") * 150 >= text.count("\n")


def package_prompts(tokenizer, package: str = "rich", n: int = 8, n_tokens: int = 128,
                    seed: int = 0) -> tuple[list[list[int]], dict]:
    """The prompts (token ids) and a record of how they were made (package, version, files)."""
    files = [f for f in package_files(package) if is_code(f.read_text(encoding="utf-8"))]
    picks = sorted(np.random.default_rng(seed).choice(len(files), size=min(n, len(files)), replace=False))
    prompts, names = [], []
    root = Path(importlib.import_module(package).__file__).parent
    for i in picks:
        text = files[i].read_text(encoding="utf-8")
        start = text.index("\n", len(text) // 2) + 1
        prompts.append(tokenizer.encode(text[start:])[:n_tokens])
        names.append(files[i].relative_to(root).as_posix())
    record = {"package": package, "version": importlib.metadata.version(package), "files": names,
              "n_tokens": n_tokens, "seed": seed, "rule": "code files only; first line break after each file's middle"}
    return prompts, record


if __name__ == "__main__":
    import edgecpm

    tok = edgecpm.Tokenizer.from_pretrained(MODELS / "target")
    prompts, record = package_prompts(tok, *(sys.argv[1:2] or ["rich"]))
    print(record)
    for p in prompts:
        print(repr(tok.decode(p)[:200]))
