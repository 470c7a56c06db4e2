"""Run one prompt through edgecpm from your own program: stream the text, then print the stats.

    python samples/run_prompt.py path/to/MiniCPM4-0.5B "The capital of France is"
    python samples/run_prompt.py bundle-0.5B/ "Hello" --max-new-tokens 64 --kv-budget 256MiB
    python samples/run_prompt.py ../shared/minicpm4/golden/like-0.5B --ids 1 42 7   # no tokenizer: token ids

Copy it and keep what you need: the whole API is `edgecpm.Session(...)` and `generate`/`stream`.
"""

from __future__ import annotations

import argparse
import sys

import edgecpm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="checkpoint or bundle folder")
    p.add_argument("prompt", nargs="?", default="The capital of France is")
    p.add_argument("--ids", type=int, nargs="+", help="prompt as token ids (for folders without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--kv-budget", default="512MiB")
    p.add_argument("--backend", default="auto")
    args = p.parse_args()

    try:
        s = edgecpm.Session(args.path, backend=args.backend, kv_budget=args.kv_budget)
        if args.ids:
            # Without a tokenizer there is no text to stream: generate and print the ids.
            g = s.generate(args.ids, max_new_tokens=args.max_new_tokens, ignore_eos=True)
            print(g.token_ids)
        else:
            for piece in s.stream(args.prompt, max_new_tokens=args.max_new_tokens):
                print(piece, end="", flush=True)
            print()
            g = s.last
    except (edgecpm.EdgeCPMError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = g.stats
    print(f"[{g.finish_reason}] prefill {st['prefill_tok_s']:.1f} tok/s, decode {st['decode_tok_s']:.1f} tok/s, "
          f"KV in use {st['kv_bytes_in_use'] / 2**20:.2f} MiB of {s.memory()['kv_budget_bytes'] / 2**20:.0f} MiB",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
