"""Serving: an OpenAI-compatible HTTP API with continuous batching, and the Gradio web demo.

    from lmforge.serve.app import create_app
    app = create_app(engine, "my-model", api_key=None)      # FastAPI; run with uvicorn

- app.py        the endpoints (/v1/models, /v1/completions, /v1/chat/completions, /health)
- responses.py  the OpenAI response bodies, whole and streamed (SSE)
- auth.py       the API key (Bearer), and what it protects
- protocol.py   request bodies (strict types) and OpenAI-style error bodies
- scheduler.py  the background decode loop that batches concurrent requests
- server.py     uvicorn in the foreground (CLI) or a background thread (tests, benchmarks)
- web*.py       the Gradio chat demo (`lmforge web`)
"""

# Prompts x n of one request (`lmforge serve --max-sequences-per-request`). Each is queued and
# tokenized up front; 2048 prompts x n=16 once held a server for 85 s. 256 = 16 full batches of
# the default --max-batch-size. Here, not in app.py, so that `lmforge serve --help` stays light.
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 256
