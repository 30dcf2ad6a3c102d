#!/bin/sh
# Container entrypoint for lmforge.
#
#   serve [ARGS...]   the OpenAI-compatible API on port 8000 (the default command)
#   web [ARGS...]     the Gradio web demo on port 7860
#   anything else     run as a command, e.g. `lmforge generate --model nano "Hello"` or `bash`
#
# The model is $LMFORGE_MODEL (the bundled SmolLM2-135M-Instruct unless set) unless ARGS choose
# one with --model (or, for `web`, --server-url). Extra ARGS go to the lmforge command and win
# over the defaults here, e.g. `web --server-url http://api:8000/v1`.
set -eu

MODEL="${LMFORGE_MODEL:-smollm2-135m-instruct}"
# Inside a container the servers listen on 0.0.0.0: 127.0.0.1 would only be reachable from inside
# the container itself, so `docker run -p` could not forward to it. Keep the service private on
# the host by publishing to the host's loopback: `docker run -p 127.0.0.1:8000:8000 ...`.
HOST=0.0.0.0

# True when the arguments already say where replies come from.
chooses_model() {
  for arg in "$@"; do
    case "$arg" in
      --model|--model=*|--server-url|--server-url=*) return 0 ;;
    esac
  done
  return 1
}

command="${1:-serve}"
[ "$#" -gt 0 ] && shift

case "$command" in
  serve|web)
    if [ "$command" = serve ]; then port=8000; else port=7860; fi
    if chooses_model "$@"; then
      exec lmforge "$command" --host "$HOST" --port "$port" "$@"
    fi
    exec lmforge "$command" --model "$MODEL" --host "$HOST" --port "$port" "$@"
    ;;
  *)
    exec "$command" "$@"
    ;;
esac
