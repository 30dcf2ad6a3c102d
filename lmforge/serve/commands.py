"""`lmforge serve`: the OpenAI-compatible HTTP API (FastAPI + uvicorn) with continuous batching."""
from __future__ import annotations

import argparse
import os
import sys

from ..cli import HelpFormatter, check_port, is_loopback
from ..errors import UserError
from ..infer.commands import add_model_arguments, load_engine, model_name
from . import DEFAULT_MAX_SEQUENCES_PER_REQUEST


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Serve a model over an OpenAI-compatible HTTP API: /v1/models, /v1/completions, "
                          "/v1/chat/completions (streaming with stream=true) and /health. Concurrent requests "
                          "share one batched decode loop.")
    parser.formatter_class = HelpFormatter
    parser.epilog = ("example:\n  lmforge serve --model smollm2-135m-instruct --port 8000\n"
                     "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                     "    -d '{\"model\": \"smollm2-135m-instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}]}'\n"
                     "  lmforge serve --model smollm2-135m-instruct --adapter countdown=runs/lora/adapter "
                     "--adapter chat=runs/chat/adapter\n"
                     "    (requests with model 'countdown' or 'chat' use that adapter; all decode in one batch)")
    add_model_arguments(parser)
    parser.set_defaults(context_policy="error")   # an API client should hear that its prompt is too long
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every path except /health, /openapi.json "
                             "included; the /docs and /redoc pages are then off (a browser cannot send the key). "
                             "Falls back to $LMFORGE_API_KEY; none = open, with /docs on")
    parser.add_argument("--model-name", default=None, help="model id clients send; none = the REF's name")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (KV-cache rows)")
    parser.add_argument("--max-sequences-per-request", type=int, default=DEFAULT_MAX_SEQUENCES_PER_REQUEST,
                        metavar="N", help="most sequences (prompts x n) one request may ask for; more get a 400. "
                                          "Rows are shared fairly between requests either way")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="context length to serve, and the max_tokens limit; none = min(the model's, 2048)")
    from ..rag.options import add_rag_arguments

    add_rag_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    check_port(args.port)
    if args.max_sequences_per_request < 1:
        raise UserError(f"--max-sequences-per-request {args.max_sequences_per_request} is below 1; use 1 or more")
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    engine = load_engine(args, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, several=True)
    name = args.model_name or model_name(args.model)
    from ..rag.options import rag_from_args

    app = create_app(engine, name, api_key=api_key, max_sequences_per_request=args.max_sequences_per_request,
                     rag=rag_from_args(args))
    if api_key is None and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key; anyone who can reach it can use it "
              "(set --api-key or LMFORGE_API_KEY)", file=sys.stderr)
    served = f"'{name}'" + "".join(f", adapter '{adapter}'" for adapter in
                                   (engine.adapters.names if engine.adapters is not None else []))
    print(f"serving {served} at http://{args.host}:{args.port}/v1 (OpenAI-compatible; "
          f"batch {engine.max_batch_size}, context {engine.context_length}); Ctrl-C to stop", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0

