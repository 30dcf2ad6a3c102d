"""The arena's web page: two anonymous answers stream side by side, you vote, then see who was who.

    from lmforge.eval.arena import load_arena_model
    from lmforge.eval.arena_web import build_arena_app
    from lmforge.serve.web import launch
    app = build_arena_app(load_arena_model("smollm2-135m-instruct"), load_arena_model("runs/speedrun"),
                          BattleLog("artifacts/arena/battles.sqlite"), SamplingParams(max_new_tokens=200))
    launch(app, port=7861)

The model names live only in the server-side session state (gr.State), never in the page, until
the vote is recorded. Every vote is appended to the battle log before the names are shown.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

from ..errors import UserError
from ..serve import web as _web   # noqa: F401  (sets Gradio's offline settings before it is imported)
from .arena import ArenaModel, stream_pair
from .battle_log import BattleLog, BattleRecord

import gradio as gr  # noqa: E402

VOTES = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}


@dataclass
class PendingBattle:
    """One battle on one page, between its answers and its vote (server-side only)."""

    prompt: str
    model_a: str
    model_b: str
    answer_a: str = ""
    answer_b: str = ""
    done: bool = False
    voted: bool = False


def build_arena_app(first: ArenaModel, second: ArenaModel, log: BattleLog, params: Any,
                    prompts: Sequence[str] = (), seed: int | None = None, title: str = "lmforge arena") -> gr.Blocks:
    """A Gradio Blocks page battling `first` and `second`; launch it with lmforge.serve.web.launch."""
    models = {first.name: first, second.name: second}
    rng = random.Random(seed)          # seats (and the random-prompt button)
    concurrency = min(first.engine.max_batch_size, second.engine.max_batch_size)

    def buttons(enabled: bool) -> list[Any]:
        return [gr.update(interactive=enabled) for _ in VOTES]

    def battle(prompt: str, state: PendingBattle | None) -> Iterator[list[Any]]:
        if not prompt.strip():
            raise gr.Error("Type a prompt first (or press 'Random prompt').")
        names = [first.name, second.name]
        rng.shuffle(names)                              # the coin flip for the seats
        pending = PendingBattle(prompt.strip(), *names)
        yield ["", "", pending, "*Both models are answering...*", *buttons(False)]
        try:
            for text_a, text_b in stream_pair(models[pending.model_a].engine, models[pending.model_b].engine,
                                              pending.prompt, replace(params, seed=rng.randrange(2**31))):
                pending.answer_a, pending.answer_b = text_a, text_b
                yield [text_a, text_b, pending, "*Both models are answering...*", *buttons(False)]
        except UserError as error:
            raise gr.Error(str(error)) from None
        pending.answer_a, pending.answer_b, pending.done = pending.answer_a.strip(), pending.answer_b.strip(), True
        yield [pending.answer_a, pending.answer_b, pending, "*Which answer is better? Vote to see the models.*",
               *buttons(True)]

    def vote(winner: str):
        def cast(state: PendingBattle | None) -> list[Any]:
            if state is None or not state.done or state.voted:
                raise gr.Error("Start a battle first: type a prompt and press 'Battle'.")
            record = BattleRecord(model_a=state.model_a, model_b=state.model_b, winner=winner, judge="human",
                                  prompt=state.prompt, answer_a=state.answer_a, answer_b=state.answer_b,
                                  session="web")
            log.record(record)                         # on disk before the names are revealed
            state.voted = True
            reveal = (f"**Model A:** `{state.model_a}`  \n**Model B:** `{state.model_b}`  \n"
                      f"Your vote: **{VOTES[winner]}** (battle #{record.id} saved). Type another prompt to battle again.")
            return [state, reveal, *buttons(False)]
        return cast

    def random_prompt() -> str:
        return rng.choice(list(prompts)) if prompts else ""

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nTwo anonymous models answer the same prompt. Vote for the better answer; "
                    "the models' names are shown after your vote.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="Ask both models something", lines=2, scale=4,
                                elem_id="arena-prompt")
            with gr.Column(scale=1, min_width=160):
                battle_button = gr.Button("Battle", variant="primary", elem_id="battle-button")
                random_button = gr.Button("Random prompt", elem_id="random-prompt", visible=bool(prompts))
        with gr.Row():
            answer_a = gr.Textbox(label="Model A", lines=12, interactive=False, elem_id="answer-a")
            answer_b = gr.Textbox(label="Model B", lines=12, interactive=False, elem_id="answer-b")
        with gr.Row():
            vote_buttons = [gr.Button(label, interactive=False, elem_id=f"vote-{key.replace('_', '-')}")
                            for key, label in VOTES.items()]
        reveal = gr.Markdown("", elem_id="reveal")
        state = gr.State(None)

        battle_outputs = [answer_a, answer_b, state, reveal, *vote_buttons]
        for trigger in (battle_button.click, prompt.submit):
            trigger(battle, [prompt, state], battle_outputs, concurrency_limit=concurrency,
                    concurrency_id="battle")
        random_button.click(random_prompt, None, prompt)
        for key, button in zip(VOTES, vote_buttons):
            button.click(vote(key), [state], [state, reveal, *vote_buttons])
    return app
