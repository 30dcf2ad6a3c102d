"""SFT data: conversations -> held-out split -> token ids with assistant masks -> batch sources.

    data = prepare_sft_data(config, tokenizer, rank=0, world_size=1)
    data.train        # SFTBatches over the training examples (packing or padding)
    data.val          # SFTBatches over the held-out conversations, for val loss
    data.prompts      # held-out prompts (all but the last reply) to answer and score
    data.report       # how many examples were kept, truncated, dropped

The held-out conversations are chosen by the seed before anything is tokenized, so the same
conversations are held out whatever seq_len or packing is: val loss and accuracy are comparable
across runs of one dataset.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

from ..data.chat_batches import ChatExample, FitReport, SFTBatches, fit_examples
from ..errors import UserError


@dataclass
class HeldOutPrompt:
    """A held-out conversation cut before its last assistant reply."""

    messages: list[dict[str, str]]       # the conversation up to (not including) the reply
    prompt_ids: list[int]                # rendered with the generation prompt (the assistant's turn opened)
    reference: str                       # the held-out reply
    meta: dict[str, Any] | None = None   # what a scorer needs (reasoning-gym's entry)


@dataclass
class SFTData:
    train: SFTBatches
    val: SFTBatches
    prompts: list[HeldOutPrompt]
    report: FitReport
    val_report: FitReport
    conversations: int                   # read from the source
    scored: bool = False                 # the prompts have a task scorer (accuracy is measured)
    train_tokens: int = 0                # tokens per epoch (all processes)
    trained_tokens: int = 0              # of which trained on (mask 1)
    notes: list[str] = field(default_factory=list)


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], train_on: str) -> ChatExample:
    from ..tokenizer.chat_template import render_chat_ids

    ids, mask = render_chat_ids(tokenizer, messages, train_on=train_on)
    return ChatExample(ids, mask)


def prepare_sft_data(config: Any, tokenizer: Any, rank: int = 0, world_size: int = 1,
                     rewrite: Callable[[list[Any]], list[Any]] | None = None) -> SFTData:
    """Read, split, tokenize and batch the config's data (an SFTConfig: data, format, seq_len, ...).

    rewrite: applied to the training conversations only, after the split (sequence-level
    distillation puts the teacher's answers there; the held-out ones keep the data's)."""
    from ..data.conversations import read_conversations
    from ..tokenizer.chat_template import render_chat_ids

    conversations = read_conversations(config.data, format=config.format, limit=config.max_examples)
    if config.system_prompt:
        for conversation in conversations:
            if conversation.messages[0]["role"] != "system":
                conversation.messages.insert(0, {"role": "system", "content": config.system_prompt})
    if len(conversations) < config.val_examples + 1:
        raise UserError(f"data '{config.data}' has {len(conversations)} conversations, too few to hold out "
                        f"val_examples={config.val_examples} and train on the rest; lower val_examples or add data")
    order = list(range(len(conversations)))
    random.Random(config.seed).shuffle(order)
    held_out = [conversations[i] for i in order[:config.val_examples]]
    training = [conversations[i] for i in order[config.val_examples:]]
    if rewrite is not None:
        training = rewrite(training)

    def tokenized(items: list[Any]) -> list[ChatExample]:
        examples = []
        for conversation in items:
            try:
                examples.append(tokenize_conversation(tokenizer, conversation.messages, config.train_on))
            except UserError as error:
                raise UserError(f"{conversation.source}: {error}") from None
        return examples

    train_examples, report = fit_examples(tokenized(training), config.seq_len)
    val_examples, val_report = fit_examples(tokenized(held_out), config.seq_len)
    pad_id = next((t for t in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eot_id", None))
                   if isinstance(t, int)), 0)
    batch_args = dict(batch_size=config.batch_size, seq_len=config.seq_len, packing=config.packing, pad_id=pad_id,
                      seed=config.seed, rank=rank, world_size=world_size)
    if len(val_examples) < world_size:
        raise UserError(f"{len(val_examples)} held-out examples cannot be shared by {world_size} processes; "
                        "raise val_examples")

    prompts = []
    for conversation in held_out[:config.eval_prompts]:
        messages = conversation.messages
        # The latest reply whose conversation so far leaves room for an answer within seq_len
        # (long multi-turn chats are asked an earlier turn rather than skipped).
        for reply in reversed([i for i, message in enumerate(messages) if message["role"] == "assistant"]):
            prompt_ids, _ = render_chat_ids(tokenizer, messages[:reply], add_generation_prompt=True)
            if len(prompt_ids) + config.answer_tokens <= config.seq_len:
                prompts.append(HeldOutPrompt(messages[:reply], prompt_ids, messages[reply]["content"],
                                             conversation.meta))
                break
    return SFTData(
        train=SFTBatches(train_examples, **batch_args),
        # Validation packs like training (the loss is the same objective) but keeps a fixed order.
        val=SFTBatches(val_examples, **{**batch_args, "shuffle": False}),
        prompts=prompts, report=report, val_report=val_report, conversations=len(conversations),
        scored=bool(prompts) and all(p.meta and "task" in p.meta for p in prompts),
        train_tokens=sum(len(e.ids) for e in train_examples),
        trained_tokens=sum(sum(e.mask) for e in train_examples))
