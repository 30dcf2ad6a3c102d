"""`lmforge web`: the Gradio chat demo, on a model loaded here or on a running `lmforge serve`."""
from __future__ import annotations

import argparse

from ..cli import HelpFormatter, check_port, is_loopback
from ..errors import UserError

EXAMPLES = """example:
  lmforge web --model smollm2-135m-instruct                 # then open http://127.0.0.1:7860
  lmforge web --server-url http://127.0.0.1:8000/v1         # chat through a running `lmforge serve`"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Gradio web chat demo: streaming replies, sampling controls, a system prompt "
                          "and a model-info panel. It loads a model itself (--model) or talks to an "
                          "OpenAI-compatible server (--server-url).")
    parser.epilog = EXAMPLES
    parser.formatter_class = HelpFormatter
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="REF",
                        help="model to load: preset, run dir, HF dir, .gguf or a bundled name "
                             "(smollm2-135m-instruct)")
    source.add_argument("--server-url", metavar="URL",
                        help="base URL of a running OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=None,
                        help="API key for --server-url; when not given, $LMFORGE_API_KEY is used if set")
    parser.add_argument("--server-model", metavar="ID", default=None,
                        help="model id to request from --server-url; when not given, the first one /v1/models lists")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on; 0.0.0.0 exposes the demo (it has no login) to your network")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--device", default="auto", help="with --model: cpu, cuda, mps, or auto (cuda when available)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="with --model: a PEFT adapter directory (LoRA, merged at load; prompt/prefix/P-tuning, "
                             "kept as a KV-cache prefix)")
    parser.add_argument("--context-policy", choices=["truncate_left", "error"], default="truncate_left",
                        help="with --model: a chat too long for the context drops its oldest tokens, or is refused")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="with --model: chats generated together in one batch (also the concurrency limit)")
    parser.add_argument("--temperature", type=float, default=0.7, help="initial temperature slider value")
    parser.add_argument("--top-p", type=float, default=0.95, help="initial top-p slider value")
    parser.add_argument("--max-tokens", type=int, default=256, help="initial max-new-tokens slider value")
    from ..rag.options import add_rag_arguments

    add_rag_arguments(parser)   # retrieval runs here, so it works with --server-url too
    parser.set_defaults(func=run)



def run(args: argparse.Namespace) -> int:
    from .web_backends import ChatSettings, LocalBackend, RemoteBackend, api_key_from_env

    check_port(args.port)
    if args.model is not None and (args.api_key is not None or args.server_model is not None):
        raise UserError("--api-key and --server-model only apply to --server-url; drop them or use --server-url")
    if args.adapter is not None and args.model is None:
        raise UserError("--adapter applies to --model (a local model); drop it, or load the adapter in the server "
                        "that --server-url points to")
    defaults = ChatSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_tokens).validate()

    if args.model is not None:
        from ..infer.commands import load_engine, model_name

        print(f"loading {args.model} ...", flush=True)
        backend = LocalBackend(load_engine(args, max_batch_size=args.max_batch_size), model_name(args.model))
    else:
        backend = RemoteBackend(args.server_url, api_key=api_key_from_env(args.api_key), model=args.server_model)

    from ..rag.generate import rag_backend
    from ..rag.options import rag_from_args

    rag = rag_from_args(args)
    if rag is not None:   # each reply ends with a "Sources" footer listing the retrieved passages
        backend = rag_backend(backend, rag)

    # Imported late: Gradio takes a few seconds to import, and --help should not wait for it.
    from .web import build_web_app, launch

    app = build_web_app(backend, defaults=defaults)
    if not is_loopback(args.host):
        print(f"note: listening on {args.host}: anyone who can reach this machine can use the demo (no login)")
    print(f"web demo for {backend.name} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    launch(app, host=args.host, port=args.port, block=True)
    return 0
