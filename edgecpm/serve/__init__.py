"""`edgecpm serve`: an OpenAI-compatible local server over one model (DESIGN.md §15).

- kv_pool: every request's KV cache out of one byte budget; finished conversations stay cached
  (evicted least recently used) so a continuation prefills only its new tokens.
- engine: one scheduler thread owns the backend (one copy of the weights) and steps the running
  requests in turn; a bounded admission queue with a timeout in front.
- chat_prompt: OpenAI messages -> token ids, the way Session.chat builds them.
- app: the FastAPI app (extra `serve`: fastapi, uvicorn) and `serve()`, what the CLI runs.
"""
