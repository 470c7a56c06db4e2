"""The `edgecpm` command line (DESIGN.md §3): export, build, run, chat, bench, freq, ngrams, inspect, serve,
demo.

Each subcommand is one `cmd_<name>(args) -> int` function registered in `build_parser()`;
options shared by several subcommands come from `add_session_options` (backend, KV budget, dtype,
threads) and `add_sampling_options` (max new tokens, temperature, top-p/k, penalty, seed, stop,
ignore-eos), and `sampling_kwargs(args)` turns them into keyword arguments of `Session.generate`.

Errors: an `edgecpm.EdgeCPMError` or `ValueError` prints `edgecpm: error: <message>` and exits 2
without a traceback (`--debug` shows it). Importing this module, and `inspect`, never import torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

from edgecpm.backends import AUTO_RULE, BACKENDS
from edgecpm.cli_options import (
    add_quantize_options,
    add_sampling_options,
    add_session_options,
    check_sampling,
    ngram_spec,
    open_session,
    sampling_kwargs,
    spec_config,
)
from edgecpm.errors import BackendUnavailable, BudgetError, EdgeCPMError

PROG = "edgecpm"


def print_stats(generation, file=None) -> None:
    file = file or sys.stderr
    print(f"finish_reason: {generation.finish_reason}", file=file)
    for key, value in generation.stats.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{key}: {text}", file=file)


def _stream_reply(pieces) -> str:
    """Write pieces to stdout as they come; end the reply with a newline. Returns the text."""
    text = ""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        text += piece
    if not text.endswith("\n"):
        print(flush=True)
    return text


# ---- run --------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt == "-":
        prompt = read_utf8(sys.stdin.buffer.read(), "-p -: stdin").rstrip("\n")
    if not prompt:
        raise ValueError("-p/--prompt: the prompt is empty")
    check_sampling(args)
    kwargs = sampling_kwargs(args)
    s = open_session(args)
    _stream_reply(s.stream(prompt, **kwargs))
    if args.stats and s.last is not None:
        print_stats(s.last)
    return 0


def read_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it "
                         f"first, e.g. `iconv -f latin1 -t utf-8`") from None


# ---- chat -------------------------------------------------------------------------------------
CHAT_HELP = "commands: /reset starts a new chat, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"
BUDGET_FULL = ("this conversation fills the KV budget ({}); /reset starts a new chat, or restart with a larger "
               "--kv-budget, or with --kv-policy window to keep only the most recent turns")


def cmd_chat(args: argparse.Namespace) -> int:
    check_sampling(args)
    kwargs = sampling_kwargs(args)
    s = open_session(args)
    chat = s.chat(system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    # A line that is not UTF-8 must not end the chat: its bad bytes become U+FFFD, with a warning.
    sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("> ")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            chat = s.chat(system=args.system)
            print("(new chat)", file=sys.stderr)
            continue
        if command in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        if line != (fixed := line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")):
            print("(this line is not UTF-8: its undecodable bytes were replaced by U+FFFD)", file=sys.stderr)
            line = fixed
        try:
            _stream_reply(chat.stream(line, **kwargs))
        except KeyboardInterrupt:
            # The interrupted turn is not added to the history; the session stays usable.
            print("\n(interrupted; this turn is not kept)", file=sys.stderr)
            continue
        except BudgetError as e:  # the turn did not fit: nothing was kept, the chat goes on
            print(f"{PROG}: {BUDGET_FULL.format(e)}", file=sys.stderr)
            continue
        if s.last.finish_reason == "length" and s.cache.free == 0:
            print(f"({BUDGET_FULL.format(f'{s.cache.capacity} tokens')})", file=sys.stderr)
        if args.stats:
            print_stats(s.last)


# ---- inspect (no torch) ------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from edgecpm.inspect import inspect_info, print_report

    info = inspect_info(args.path, args.kv_budget)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_report(info)
    return 0


# ---- verify (no torch) -------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    from edgecpm.bundle import verify_bundle
    from edgecpm.errors import BundleError

    report = verify_bundle(args.path, progress=sys.stderr.isatty())
    if not report.ok:
        raise BundleError(report.summary())
    print(report.summary())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from edgecpm.export.exporter import export_bundle
    except ImportError as e:
        raise BackendUnavailable(f"edgecpm export needs the export extra ({e}); "
                                 f"pip install 'edgecpm[export]'") from None
    out = export_bundle(args.path, args.output, dtype=args.dtype, force=args.force,
                        progress=sys.stderr.isatty(), sparse=args.sparse, frspec=args.frspec,
                        quantize=args.quantize, quantize_group_size=args.group_size, eagle_of=args.eagle_of,
                        ternary_activations=args.ternary_activations, lm_head=args.lm_head)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from edgecpm.export.trt_build import build_engine

    engine = build_engine(args.path, fp16=args.fp16, max_prefill=args.max_prefill, max_verify=args.max_verify,
                          plugin_lib=args.plugins, timing_cache=args.timing_cache,
                          progress=sys.stderr.isatty(), max_context=args.max_context)
    print(f"wrote {engine}", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from edgecpm.bench import print_results, run_bench

    drafts = [spec_config(args, d) for d in (args.draft_compare or ([args.draft] if args.draft else []))]
    result = run_bench(args.path, backend=args.backend, kv_budget=args.kv_budget, threads=args.threads,
                       dtype=args.dtype, prompts=args.prompt or (), prompt_len=args.prompt_len,
                       new_tokens=args.new_tokens, repeats=args.repeats, drafts=drafts, kv_policy=args.kv_policy)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_results(result)
    return 0


def _tokenizer(path):
    """A model folder's tokenizer, for the commands that only tokenize (freq, ngrams)."""
    from edgecpm.tokenizer import Tokenizer

    if (Path(path) / "tokenizer.json").exists():
        return Tokenizer.from_pretrained(path)
    # a checkpoint with only tokenizer.model: converted as `edgecpm export` does (needs its extra)
    from edgecpm.export.tokenizer_convert import load_tokenizer

    return load_tokenizer(path)


def cmd_freq(args: argparse.Namespace) -> int:
    import numpy as np

    from edgecpm.frspec import build_freq_table, count_tokens

    tok = _tokenizer(args.tokenizer)
    counts = count_tokens(tok, [Path(c) for c in args.corpus], progress=sys.stderr.isatty())
    table = build_freq_table(counts, args.r, tok.eos_token_ids, tok.special_ids)
    covered = counts[table].sum() / max(counts.sum(), 1)
    np.save(args.output, table)
    print(f"wrote {args.output}: {len(table)} ids covering {covered:.1%} of {counts.sum()} corpus tokens",
          file=sys.stderr)
    return 0


def cmd_ngrams(args: argparse.Namespace) -> int:
    from edgecpm.ngram_table import NgramTable

    table = NgramTable.build(_tokenizer(args.tokenizer), args.corpus, ngram_max=args.ngram_max,
                             min_count=args.min_count)
    table.save(args.output)
    print(f"wrote {args.output}: {len(table)} n-grams of 1-{table.ngram_max} tokens, "
          f"{Path(args.output).stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from edgecpm.serve.app import serve
    except ImportError as e:
        raise BackendUnavailable(f"serve needs fastapi and uvicorn ({e}); pip install 'edgecpm[serve]'") from None
    draft = args.draft
    if args.draft_corpus is not None:
        if draft != "ngram":
            raise ValueError("--draft-corpus is the n-gram drafter's table: add --draft ngram")
        draft = ngram_spec(args.path, args.draft_corpus)
    serve(args.path, host=args.host, port=args.port, backend=args.backend, kv_budget=args.kv_budget,
          draft=draft, threads=args.threads, max_sessions=args.max_sessions, max_queue=args.max_queue,
          queue_timeout=args.queue_timeout, api_key=args.api_key or os.environ.get("EDGECPM_API_KEY"),
          max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgecpm.demo import BUILTIN, run_demo

    run_demo(Path(args.models) if args.models else BUILTIN, max_new_tokens=args.max_new_tokens)
    return 0


# ---- parser -----------------------------------------------------------------------------------
def _sub(subparsers, name: str, help: str, description: str, epilog: str, parents):
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog, parents=parents,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from edgecpm import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="edgecpm: on-device inference for the MiniCPM4 family (export on a workstation, "
                    "run on Jetson / laptop / CPU).",
        epilog="""examples:
  edgecpm inspect path/to/MiniCPM4-0.5B
  edgecpm run path/to/MiniCPM4-0.5B -p "The capital of France is" --max-new-tokens 32
  edgecpm chat path/to/MiniCPM4-0.5B --system "Be brief."
  edgecpm <command> --help

errors print "edgecpm: error: ..." and exit with status 2; add --debug for a traceback.""",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # --debug is also accepted after the subcommand (SUPPRESS keeps the top-level value otherwise).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _sub(subs, "export", "export a Hugging Face checkpoint to a deploy bundle (ONNX)",
             "Export a Hugging Face MiniCPM4 checkpoint to a self-describing bundle folder: ONNX decoder +\n"
             "external weights, tokenizer files, manifest.json with sizes and sha256. The bundle is written\n"
             "to a temporary folder and renamed into place when complete. Runs on the workstation (needs\n"
             "the export extra: torch, onnx); the bundle then runs with --backend onnxruntime, no torch.",
             """examples:
  edgecpm export path/to/MiniCPM4-0.5B -o bundle-0.5B/
  edgecpm export path/to/MiniCPM4-0.5B -o bundle-0.5B-fp16/ --dtype fp16 --force
  edgecpm export path/to/MiniCPM4-8B -o bundle-8B-sparse/ --sparse
  edgecpm freq --tokenizer path/to/MiniCPM4-0.5B corpus/ -r 16384 -o freq.npy
  edgecpm export path/to/MiniCPM4-0.5B -o draft-0.5B/ --frspec freq.npy
  edgecpm export path/to/MiniCPM4-8B-Eagle-FRSpec --eagle-of path/to/MiniCPM4-8B -o eagle-8B/ --frspec freq.npy
  edgecpm export path/to/BitCPM4-0.5B -o bundle-bitcpm/           # ternary: packed at 2 bits
  edgecpm export path/to/BitCPM4-0.5B -o bundle-cpu/ --ternary-activations int8  # fastest on onnxruntime CPU, ~1e-3 off
  edgecpm export path/to/my-qat-model -o bundle-ternary/ --quantize ternary
  edgecpm run bundle-0.5B/ -p "The capital of France is" --backend onnxruntime""", [common])
    p.add_argument("path", metavar="PATH", help="Hugging Face checkpoint folder")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle folder to write")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="weights/compute dtype (default: fp32)")
    p.add_argument("--force", action="store_true", help="replace BUNDLE if it exists")
    p.add_argument("--sparse", action="store_true",
                   help="switch InfLLM v2 sparse attention on (DESIGN.md §7 defaults) when the checkpoint's "
                        "config.json has no sparse_config")
    p.add_argument("--frspec", default=None, metavar="FREQ.npy",
                   help="export a draft model whose LM head keeps only these ids (from `edgecpm freq`)")
    p.add_argument("--eagle-of", default=None, metavar="TARGET",
                   help="PATH is an EAGLE draft head for this target checkpoint (which lends it the embedding / "
                        "LM head it lacks); run the bundle with --draft BUNDLE next to TARGET's bundle")
    p.add_argument("--ternary-activations", default="exact", choices=("exact", "int16", "int8"),
                   help="how onnxruntime computes packed ternary linears: exact (fp32 activations, on edgecpm's "
                        "kernel where it can be built, else on onnxruntime's MatMulNBits as 3 int8 digits), int16 "
                        "(MatMulNBits on 2 digits: logits ~1e-5 relative off; only faster where edgecpm's kernel "
                        "cannot be built) or int8 (1 digit: fastest, lossy: ~1e-3); TensorRT ignores it "
                        "(default: exact)")
    add_quantize_options(p)
    p.set_defaults(func=cmd_export)

    p = _sub(subs, "build", "build a TensorRT engine for a bundle, on the device",
             "Build a TensorRT engine for an exported bundle on the device that will run it (Jetson or a\n"
             "GPU machine with TensorRT 10 and the plugin library from plugins/). The ONNX local functions\n"
             "are stripped so the custom ops map to the plugins; two optimization profiles (prefill chunk,\n"
             "decode/verify); the engine is written to BUNDLE/engines/<gpu>-trt<version>.engine and recorded\n"
             "in the manifest. Not executed in this project's CI (no GPU, no TensorRT): see plugins/README.md.",
             """examples:
  edgecpm build bundle-0.5B/
  edgecpm build bundle-8B/ --fp16 --max-prefill 1024 --max-verify 64 --max-context 16384
  EDGECPM_PLUGIN_LIB=/opt/edgecpm/libedgecpm_plugins.so edgecpm build bundle-8B/""", [common])
    p.add_argument("path", help="bundle folder")
    p.add_argument("--fp16", action="store_true", help="let TensorRT run an fp32 bundle's layers in fp16")
    p.add_argument("--max-prefill", type=int, default=512, metavar="N", help="prefill chunk tokens (default: 512)")
    p.add_argument("--max-verify", type=int, default=64, metavar="N",
                   help="decode/verify step tokens (default: 64)")
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="longest context the engine accepts (default: the model's max positions)")
    p.add_argument("--plugins", default=None, metavar="LIB",
                   help="libedgecpm_plugins.so (default: $EDGECPM_PLUGIN_LIB, then plugins/build/, build/plugins/)")
    p.add_argument("--timing-cache", default=None, metavar="PATH", help="TensorRT timing cache file")
    p.set_defaults(func=cmd_build)

    p = _sub(subs, "run", "generate text for one prompt, streamed to stdout",
             "Generate a continuation of one prompt and stream it to stdout as it is produced.\n"
             "PATH is a Hugging Face checkpoint folder (torch backend) or an exported bundle.\n"
             "The folder needs tokenizer files (tokenizer.json or tokenizer.model) for text prompts.",
             """examples:
  edgecpm run path/to/MiniCPM4-0.5B -p "The capital of France is" --max-new-tokens 32
  edgecpm run path/to/MiniCPM4-0.5B -p "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 0
  echo "Write a haiku about the sea." | edgecpm run path/to/MiniCPM4-0.5B -p - --stop "\\n\\n" --stats
  edgecpm run path/to/MiniCPM4-0.5B -p "Hello" --backend torch --kv-budget 256MiB --threads 4""", [common])
    p.add_argument("path", metavar="PATH", help="checkpoint or bundle folder")
    p.add_argument("-p", "--prompt", required=True,
                   help='the prompt text; "-" reads it from stdin (UTF-8; other encodings are refused with a hint)')
    add_session_options(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_run)

    p = _sub(subs, "chat", "interactive multi-turn chat on stdin/stdout",
             "Chat with a model, one line per user turn (ChatML template; the KV cache is reused across\n"
             "turns). " + CHAT_HELP + ".\nInput is UTF-8: bytes that are not are replaced by U+FFFD, with a warning.\n"
             "When the conversation fills --kv-budget the chat says so: /reset, a larger budget or\n"
             "--kv-policy window continue it.",
             """examples:
  edgecpm chat path/to/MiniCPM4-0.5B
  edgecpm chat path/to/MiniCPM4-0.5B --system "You are a concise assistant." --temperature 0.7 --seed 1
  printf 'hi\\n/reset\\nwhat is 2+2?\\n' | edgecpm chat path/to/MiniCPM4-0.5B --max-new-tokens 64""", [common])
    p.add_argument("path", metavar="PATH", help="checkpoint or bundle folder (with tokenizer files)")
    p.add_argument("--system", default=None, metavar="S", help="system prompt")
    add_session_options(p)
    add_sampling_options(p)
    p.set_defaults(func=cmd_chat)

    p = _sub(subs, "serve", "an OpenAI-compatible HTTP server: many clients, one model, one KV budget",
             "Serve a model on /v1/chat/completions, /v1/completions (SSE streaming or not), /v1/models and\n"
             "/health with one copy of the weights. Every request's KV cache comes out of --kv-budget;\n"
             "a continued conversation reuses its cached prefix. When the budget is held, requests wait\n"
             "(at most --max-queue of them, --queue-timeout seconds) and are then refused with 429/503.\n"
             "response_format json_object / json_schema constrains the output (llguidance). Binds\n"
             "127.0.0.1 unless --host says otherwise. Needs the serve extra: pip install 'edgecpm[serve]'.",
             """examples:
  edgecpm serve bundle-0.5B/
  edgecpm serve bundle-0.5B/ --port 8080 --kv-budget 4GiB --max-sessions 16 --api-key s3cret
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "bundle-0.5B", "messages": [{"role": "user", "content": "hi"}]}'""", [common])
    p.add_argument("path", metavar="PATH", help="checkpoint or bundle folder; its folder name is the model id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help=f"runtime to use (default: auto: {AUTO_RULE})")
    p.add_argument("--kv-budget", default="2GiB", metavar="SIZE",
                   help="the KV cache bytes of all requests together, e.g. 512MiB, 2GB (default: 2GiB)")
    p.add_argument("--draft", default=None, choices=["ngram"],
                   help="speculative decoding with the n-gram drafter (json requests decode without it)")
    p.add_argument("--draft-corpus", default=None, metavar="NGRAMS",
                   help="a corpus n-gram table (from `edgecpm ngrams`) the n-gram drafter also asks")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for the backend")
    p.add_argument("--max-sessions", type=int, default=8, metavar="N", help="requests decoding at once (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for KV budget; more get 429 (default: 64)")
    p.add_argument("--queue-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a request may wait before it gets 503 (default: 30)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $EDGECPM_API_KEY, else none)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                   help="larger request bodies get 413 (default: 1 MiB)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="longer prompts get 413 (default: what one request's KV can hold)")
    p.set_defaults(func=cmd_serve)

    p = _sub(subs, "bench", "measure prefill/decode speed, memory and speculative decoding",
             "Measure prefill and decode tokens/s, tokens per verification step, KV use and peak RSS.\n"
             "With --draft (or several --draft-compare), plain decoding and each drafter run in the same\n"
             "process on the same prompts, so the speed-ups are comparable. Prompts: --prompt texts, or\n"
             "--repeats random-token prompts of --prompt-len tokens.",
             """examples:
  edgecpm bench bundle-0.5B/
  edgecpm bench target/ --draft ngram --prompt "def fibonacci(n):" --new-tokens 64
  edgecpm bench target/ --draft-compare ngram draft/ draft-frspec/ --json > bench.json""", [common])
    p.add_argument("path", help="checkpoint or bundle folder")
    add_session_options(p)
    p.add_argument("--draft-compare", nargs="+", default=None, metavar="DRAFT",
                   help="several drafters to compare with plain decoding (each as --draft)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt text; repeatable")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens of each random prompt (default: 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="random prompts when no --prompt (default: 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_bench)

    p = _sub(subs, "freq", "build an FR-Spec token frequency table (freq.npy) from a corpus",
             "Count tokens over text files (or folders) with a model's tokenizer and write the FR-Spec table:\n"
             "the r most frequent ids (special tokens not counted, every EOS id forced in, no duplicates,\n"
             "exactly r entries), int32 .npy. A draft exported with --frspec then computes only these r\n"
             "logits; the target still verifies over the full vocabulary.",
             """examples:
  edgecpm freq --tokenizer path/to/MiniCPM4-0.5B corpus.txt more/ -r 16384 -o freq.npy
  edgecpm export path/to/MiniCPM4-0.5B -o draft/ --frspec freq.npy""", [common])
    p.add_argument("corpus", nargs="+", help="text files or folders")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="checkpoint or bundle folder with tokenizer files")
    p.add_argument("-r", type=int, default=16384, help="table length (default: 16384)")
    p.add_argument("-o", "--output", required=True, help="where to write freq.npy")
    p.set_defaults(func=cmd_freq)

    p = _sub(subs, "ngrams", "build a corpus n-gram table (ngrams.npz) for the n-gram drafter",
             "Tokenize text files (or folders; a file's records split by \\x1e are separate documents) with a\n"
             "model's tokenizer and write, for every n-gram of 1 to --ngram-max tokens, the token that most\n"
             "often followed it (REST-style retrieval drafting, edgecpm.ngram_table). With --draft ngram\n"
             "--draft-corpus ngrams.npz the drafter takes the table's guess where it is likelier right than\n"
             "the context's; the target still decides every token. Text like what the model will write\n"
             "helps most (its training data, the user's codebase).",
             """examples:
  edgecpm ngrams --tokenizer path/to/MiniCPM4-0.5B corpus/ -o ngrams.npz
  edgecpm run bundle/ -p "def main():" --draft ngram --draft-corpus ngrams.npz --stats""", [common])
    p.add_argument("corpus", nargs="+", help="text files or folders")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="checkpoint or bundle folder with tokenizer files")
    p.add_argument("--ngram-max", type=int, default=4, metavar="N", help="longest n-gram (default: 4)")
    p.add_argument("--min-count", type=int, default=2, metavar="N",
                   help="keep an n-gram whose most frequent next token followed it at least N times (default: 2)")
    p.add_argument("-o", "--output", required=True, help="where to write ngrams.npz")
    p.set_defaults(func=cmd_ngrams)

    p = _sub(subs, "inspect", "summarize a checkpoint or bundle: config, parameters, bytes, KV cache per token",
             "Summarize a MiniCPM4 checkpoint or bundle folder without loading its weights (reads config.json\n"
             "and the safetensors headers, or manifest.json, only; torch is not needed): architecture, muP\n"
             "scalings, RoPE choice, sparse attention, parameter count, bytes on disk per dtype, KV cache\n"
             "bytes per token.\n"
             "Rich tables on a terminal, plain text otherwise, JSON with --json.",
             """examples:
  edgecpm inspect path/to/MiniCPM4-0.5B
  edgecpm inspect path/to/MiniCPM4-8B --kv-budget 4GiB
  edgecpm inspect bundle-0.5B/
  edgecpm inspect path/to/MiniCPM4-0.5B --json | python -m json.tool""", [common])
    p.add_argument("path", metavar="PATH", help="checkpoint folder (or its config.json) or bundle folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--kv-budget", default="1GiB", metavar="SIZE",
                   help="budget for the 'tokens that fit' figure (default: 1GiB)")
    p.set_defaults(func=cmd_inspect)

    p = _sub(subs, "verify", "re-hash every file of a bundle against its manifest (bit rot, bad copies)",
             "Check a bundle's manifest (every file the bundle uses listed with size and sha256, graph I/O\n"
             "matching the config) and re-hash every file and engine, whatever the .verified stamp says: a\n"
             "loaded bundle is otherwise hashed only on its first load after a copy, so a byte that rotted in\n"
             "place, or a damaged file copied with its mtime (cp -a, rsync -t), goes unnoticed. Prints OK with\n"
             "the files and bytes checked, or each missing, resized or corrupted file and exits with status 2.",
             """examples:
  edgecpm verify bundle-0.5B/
  rsync -a bundle-8B/ jetson:/opt/models/bundle-8B/ && ssh jetson edgecpm verify /opt/models/bundle-8B""",
             [common])
    p.add_argument("path", metavar="BUNDLE", help="bundle folder")
    p.set_defaults(func=cmd_verify)

    p = _sub(subs, "demo", "the whole flow on the built-in wind-tunnel models (no download)",
             "Export the built-in MiniCPM4-architecture target and draft (samples/wind_tunnel, trained on\n"
             "the CPython standard library) to bundles in ~/.cache/edgecpm/demo on first use, then stream a\n"
             "completion with speculative decoding and run a chat turn, printing speed and KV statistics.",
             """examples:
  edgecpm demo
  edgecpm demo --max-new-tokens 200
  EDGECPM_CACHE=/tmp/edgecpm edgecpm demo --models samples/wind_tunnel""", [common])
    p.add_argument("--models", default=None, metavar="DIR",
                   help="a folder with target/ (and optionally draft/) checkpoints (default: the built-in ones)")
    p.add_argument("--max-new-tokens", type=int, default=96, metavar="N", help="default: 96")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (EdgeCPMError, ValueError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (e.g. `edgecpm run ... | head`): not an error of ours.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
