"""Talk to `edgecpm serve` with the official openai client: a streamed two-turn chat, a JSON answer
that follows a schema, and a plain completion.

    edgecpm serve bundle-0.5B/ --kv-budget 2GiB &          # serves model id "bundle-0.5B"
    python samples/serve_client.py --model bundle-0.5B
    python samples/serve_client.py --base-url http://127.0.0.1:8080/v1 --api-key s3cret --model bundle-0.5B

Needs `pip install openai`. Any OpenAI-compatible client works the same way: point its base URL at
the server. The server keeps each conversation's KV cache, so the second turn does not prefill the
first one again.
"""

from __future__ import annotations

import argparse
import json
import sys

import openai

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["city", "country", "population_millions"],
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "number", "minimum": 0, "maximum": 100},
    },
}


def stream_reply(client: openai.OpenAI, model: str, messages: list[dict]) -> str:
    """Print the assistant's reply as it arrives; return it."""
    chunks = client.chat.completions.create(model=model, messages=messages, stream=True, temperature=0.7,
                                            max_tokens=128)
    reply = ""
    for chunk in chunks:
        piece = chunk.choices[0].delta.content if chunk.choices else None
        if piece:
            print(piece, end="", flush=True)
            reply += piece
    print()
    return reply


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none", help="the server's --api-key (any text when it has none)")
    p.add_argument("--model", default=None, help="model id (default: the one the server lists)")
    args = p.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = args.model or client.models.list().data[0].id
    except openai.APIConnectionError:
        print(f"no server at {args.base_url}; start one with `edgecpm serve BUNDLE`", file=sys.stderr)
        return 1

    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name a large city in France."}]
    for follow_up in ("And one in Japan?", None):
        print(f"> {messages[-1]['content']}")
        messages.append({"role": "assistant", "content": stream_reply(client, model, messages)})
        if follow_up:
            messages.append({"role": "user", "content": follow_up})

    r = client.chat.completions.create(
        model=model, temperature=0, max_tokens=96,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
    print("json:", json.loads(r.choices[0].message.content), f"({r.usage.completion_tokens} tokens)")

    r = client.completions.create(model=model, prompt="The three primary colors are", max_tokens=24, temperature=0)
    print("completion:", r.choices[0].text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
