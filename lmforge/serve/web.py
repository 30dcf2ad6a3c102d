"""The Gradio web chat demo: streaming chat, sampling controls, system prompt, model-info panel.

    from lmforge import load
    from lmforge.infer import Engine
    from lmforge.serve.web import build_web_app, launch
    from lmforge.serve.web_backends import LocalBackend, RemoteBackend
    backend = LocalBackend(Engine(*load("smollm2-135m-instruct")), "smollm2-135m-instruct")
    # or: backend = RemoteBackend("http://127.0.0.1:8000/v1")   (a running `lmforge serve`)
    launch(build_web_app(backend), host="127.0.0.1", port=7860)

The page never talks to the internet: analytics and the version check are off, there are no
share links, and the default theme uses local fonts.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from ..errors import UserError
from .web_backends import ChatBackend, ChatSettings, Message

# Gradio reads these when it is imported and at launch; set them before importing it.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402  (must follow the environment settings above)


def message_text(content: Any) -> str:
    """The text of a Gradio chat message: a string, or a list of parts like {"type": "text", ...}."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", "")) if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def build_messages(message: str, history: list[dict[str, Any]], system_prompt: str) -> list[Message]:
    """Gradio's (message, history) plus the system prompt -> OpenAI-style chat messages."""
    messages: list[Message] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for turn in history:
        if turn.get("role") in ("user", "assistant"):
            messages.append({"role": turn["role"], "content": message_text(turn.get("content"))})
    messages.append({"role": "user", "content": message})
    return messages


def build_web_app(backend: ChatBackend, title: str | None = None,
                  defaults: ChatSettings | None = None) -> gr.Blocks:
    """A Gradio Blocks app chatting through `backend`. Launch it with `launch(app, ...)`."""
    defaults = defaults or ChatSettings()
    title = title or f"lmforge chat - {backend.name}"
    # A reply can use at most the context minus one prompt token; ask for more and the engine refuses.
    max_tokens_limit = min(4096, backend.context_length - 1) if backend.context_length else 4096
    default_max_tokens = min(defaults.max_new_tokens, max(1, max_tokens_limit // 2))

    def respond(message: str, history: list[dict[str, Any]], system_prompt: str, temperature: float,
                top_p: float, max_new_tokens: float) -> Iterator[str]:
        """Gradio streams whatever this yields; ChatInterface expects the reply *so far* each time."""
        if not message.strip():
            return
        settings = ChatSettings(temperature=float(temperature), top_p=float(top_p),
                                max_new_tokens=int(max_new_tokens))
        reply = ""
        try:
            for piece in backend.stream_reply(build_messages(message, history, system_prompt), settings):
                reply += piece
                yield reply
        except UserError as error:
            # Shown as a notice on the page; the partial reply stays visible.
            raise gr.Error(str(error)) from None
        if not reply:
            # Not added to the chat: a made-up assistant turn would be sent back as context.
            gr.Warning("The model ended its reply without any text (it chose its end token first).")

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                gr.Markdown("### System prompt and sampling")
                system_prompt = gr.Textbox(label="System prompt", lines=3, value="",
                                           placeholder="e.g. You are a concise assistant.", elem_id="system-prompt")
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                        label="Temperature (0 = greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p", elem_id="top-p")
                max_new_tokens = gr.Slider(1, max_tokens_limit, value=default_max_tokens, step=1,
                                           label="Max new tokens", elem_id="max-new-tokens")
            with gr.Column(scale=3):
                # The controls on the left are already rendered, so ChatInterface uses them in place.
                gr.ChatInterface(
                    respond,
                    chatbot=gr.Chatbot(label=backend.name, height=480, elem_id="chatbot"),
                    textbox=gr.Textbox(placeholder="Type a message and press Enter", elem_id="chat-input",
                                       show_label=False, submit_btn=True),
                    additional_inputs=[system_prompt, temperature, top_p, max_new_tokens],
                    concurrency_limit=backend.max_concurrency,
                    fill_height=False,
                )
                with gr.Accordion("Model info", open=True):
                    gr.Markdown(backend.model_info(), elem_id="model-info")
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve `app` at http://host:port without share links; `block=False` returns at once (tests)."""
    try:
        app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False,
                   prevent_thread_lock=not block, show_error=True, quiet=True, mcp_server=False)
    except OSError as error:
        # Gradio reports a taken port as "Cannot find empty port in range: P-P"; say it plainly.
        reason = "the port is already in use" if "empty port" in str(error) else str(error)
        raise UserError(f"cannot serve the web demo on {host}:{port} ({reason}); "
                        "pick a free port with --port or another --host") from None
