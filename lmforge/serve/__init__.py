"""Serving: an OpenAI-compatible HTTP API with continuous batching, and the Gradio web demo.

    from lmforge.serve.app import create_app
    app = create_app(engine, "my-model", api_key=None)      # FastAPI; run with uvicorn

- app.py        the endpoints (/v1/models, /v1/completions, /v1/chat/completions, /health)
- protocol.py   request bodies (strict types) and OpenAI-style error bodies
- scheduler.py  the background decode loop that batches concurrent requests
- server.py     uvicorn in the foreground (CLI) or a background thread (tests, benchmarks)
- web*.py       the Gradio chat demo (`lmforge web`)
"""
