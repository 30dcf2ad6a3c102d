"""`lmforge chat`: a multi-turn terminal chat that streams the model's replies.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit.
It reads plain lines when stdin is not a terminal, so `printf 'hi\\n/reset\\n' | lmforge chat ...`
works (that is how it is tested).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli import HelpFormatter
from ..errors import UserError
from .commands import (add_model_arguments, add_sampling_arguments, add_tool_arguments, load_engine, sampling_from_args,
                       tools_from_args)

HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /exit"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Chat with a model in the terminal. " + HELP + "."
    parser.formatter_class = HelpFormatter
    parser.epilog = 'example:\n  lmforge chat --model smollm2-135m-instruct --system "You are a pirate." --seed 0'
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_arguments(parser)
    add_tool_arguments(parser)
    from ..rag.options import add_rag_arguments

    add_rag_arguments(parser)
    parser.set_defaults(func=run)


class ChatSession:
    """The conversation so far, and a reply streamed for each new user message."""

    def __init__(self, engine: Any, params: Any, system: str | None = None, tools: Any = None) -> None:
        self.engine, self.params, self.system = engine, params, system
        self.turns: list[dict[str, str]] = []   # user/assistant messages, oldest first
        self.tools = tools                      # a ToolRegistry (--tools): replies go through the tool loop
        self.rag: Any = None                    # a lmforge.rag RagChat (--rag): passages go into the last message
        self.sources: list = []                 # the passages retrieved for the last reply

    def messages(self) -> list[dict[str, str]]:
        system_text = "\n\n".join(part for part in (self.system, self.tools and self.tools.describe()) if part)
        system = [{"role": "system", "content": system_text}] if system_text else []
        return system + self.turns

    def reset(self) -> None:
        self.turns = []

    def reply(self, user_text: str):
        """Yield the assistant's reply in pieces; the turn is kept once the reply is complete."""
        self.turns.append({"role": "user", "content": user_text})
        prompt_ids = self._fitting_prompt()
        pieces = []
        if self.tools is not None:
            from .tools import ToolLoop

            stream = ToolLoop(self.engine, self.tools).stream(prompt_ids, self.params)
        else:
            stream = self.engine.stream(prompt_ids, self.params)
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        except BaseException:
            self.turns.pop()
            raise
        self.turns.append({"role": "assistant", "content": "".join(pieces)})

    def _fitting_prompt(self) -> list[int]:
        """Drop the oldest turns (never the system prompt or the new message) until the prompt fits;
        the prompt's token ids (message text encoded as plain text, so it cannot fake a turn)."""
        from .chat import fit_chat

        source = self.messages()
        if self.rag is not None:
            source, self.sources = self.rag.augment(source)
        messages, prompt_ids = fit_chat(self.engine.tokenizer, self.engine.context_length, source,
                                        self.params.max_new_tokens)
        kept = len(messages) - (messages[0]["role"] == "system")
        # The kept turns as the user wrote them (with --rag, the passages are not kept in the history).
        self.turns = self.turns[len(self.turns) - kept:] if self.rag is not None else messages[len(messages) - kept:]
        return prompt_ids


def run(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    tools = tools_from_args(args)
    engine = load_engine(args, max_batch_size=1)
    session = ChatSession(engine, params, args.system, tools)
    from ..rag.generate import sources_markdown
    from ..rag.options import rag_from_args

    session.rag = rag_from_args(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model}; {HELP}")
    while True:
        line = _read_line(interactive)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("[conversation reset]")
        elif text == "/system" or text.startswith("/system "):
            session.system = text[len("/system"):].strip() or None
            print(f"[system prompt {'set' if session.system else 'cleared'}]")
        elif text.startswith("/"):
            print(f"[unknown command {text.split()[0]}; {HELP}]")
        else:
            if interactive:
                sys.stdout.write("assistant> ")
            try:
                for piece in session.reply(text):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                if session.rag is not None and session.sources:
                    sys.stdout.write("\n[sources]\n" + sources_markdown(session.sources).replace("**", ""))
            except KeyboardInterrupt:   # Ctrl-C stops this reply, not the chat
                sys.stdout.write(" [interrupted; the turn was dropped]")
            except UserError as error:  # e.g. a message longer than the context: say so, keep chatting
                sys.stdout.write(f"[error: {error}; the turn was dropped]")
            sys.stdout.write("\n")
            sys.stdout.flush()
    return 0


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None
