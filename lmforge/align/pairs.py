"""Building preference pairs with nothing to download: verifiable rewards and AI feedback.

    pairs, stats = verifiable_pairs(model, tok, conversations, k=4)     # reasoning-gym: the task scores
    pairs, stats = ai_feedback_pairs(model, judge, judge_tok, tok, prompts)  # a judge model compares

Verifiable pairs: k answers per prompt are sampled in one batch through lmforge's engine
(continuous batching, KV cache); the task's own scorer splits them. A prompt gives a pair only
when its answers disagree (some scored best, some lower): chosen = a best one, rejected = a
lower one. All-correct and all-wrong prompts carry no preference and are counted, not used.

AI feedback: two sampled answers per prompt; the judge is asked which is better (optionally
against a constitution principle) in both orders, and reads its preference from the next-token
log-probabilities of "A" and "B" (one forward per question, no sampling). If the two orders
disagree, the judge is only reacting to position: a tie, dropped.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError
from .data import Pair

JUDGE_TEMPLATE = ("Which response to the request is better{criterion}? Reply with the letter A or B only.\n\n"
                  "Request: {prompt}\n\nResponse A: {a}\n\nResponse B: {b}")


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    ties: int = 0                      # AI feedback: the judge disagreed with itself across orders
    all_best: int = 0                  # verifiable: every sample scored best (no preference)
    all_worse: int = 0                 # verifiable: every sample scored 0 (no preference)
    mean_score: float = 0.0            # of all samples
    from_reference: int = 0            # verifiable, reference_chosen: prompts whose chosen is the task's answer
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{self.pairs} pairs from {self.prompts} prompts"]
        if self.all_best or self.all_worse:
            parts.append(f"{self.all_best} prompts all correct and {self.all_worse} all wrong (no preference)")
        if self.ties:
            parts.append(f"{self.ties} ties dropped (the judge's verdict flipped with the order)")
        if self.from_reference:
            parts.append(f"{self.from_reference} with the task's reference answer as chosen (no sample was correct)")
        if self.mean_score:
            parts.append(f"mean sample score {self.mean_score:.3f}")
        return "; ".join(parts)


def sample_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[list[dict[str, str]]], k: int,
                   temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                   max_batch_size: int = 32, top_p: float = 1.0) -> list[list[str]]:
    """k sampled replies per prompt (chat template), all prompts x k in one engine batch; seeded."""
    from ..infer.engine import Engine
    from ..infer.sampling import SamplingParams
    from ..tokenizer.chat_template import render_chat_ids

    ids = [render_chat_ids(tokenizer, messages, add_generation_prompt=True)[0] for messages in prompts]
    longest = max(len(x) for x in ids) + max_new_tokens
    engine = Engine(model, tokenizer, max_batch_size=min(max_batch_size, len(ids) * k),
                    max_seq_len=min(longest, model.config.max_seq_len), context_policy="error")
    group = engine.new_group()
    sequences = [engine.submit(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          top_p=top_p, seed=seed * 1_000_003 + i * k + j),
                               group=group)
                 for i, prompt_ids in enumerate(ids) for j in range(k)]
    while not all(sequence.finished for sequence in sequences):
        engine.step()
    for sequence in sequences:
        sequence.raise_if_failed()
    texts = [sequence.result().text for sequence in sequences]
    return [texts[i * k:(i + 1) * k] for i in range(len(ids))]


def verifiable_pairs(model: torch.nn.Module, tokenizer: Any, conversations: list[Any], k: int = 4,
                     temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                     pairs_per_prompt: int = 1, reference_chosen: bool = False,
                     reward: Any = None) -> tuple[list[Pair], PairStats]:
    """Pairs from reasoning-gym conversations (their meta scores answers): see the module doc.

    reference_chosen: when no sample is correct, the task's reference answer (which its scorer
    gives 1.0) is the chosen reply, so a prompt the policy always fails still teaches something.
    reward: a rewards.RewardFunctions that scores the samples instead of the task's scorer (e.g.
    gsm8k: the right number anywhere in a sentence, where the scorer wants the bare number).
    """
    from ..data.chat_corpora import score_answer
    from .rewards import Prompt

    if k < 2:
        raise UserError(f"k={k}: a pair needs at least 2 samples per prompt; use k >= 2")
    prompts = [c.messages[:-1] for c in conversations]
    answers = sample_answers(model, tokenizer, prompts, k, temperature, max_new_tokens, seed)
    stats = PairStats(prompts=len(prompts))
    pairs, total = [], 0.0
    for conversation, prompt, replies in zip(conversations, prompts, answers):
        if reward is None:
            scores = [score_answer(conversation.meta, reply) for reply in replies]
        else:
            reference_prompt = Prompt(prompt, conversation.messages[-1]["content"], conversation.meta,
                                      conversation.source)
            scores = reward([reference_prompt] * len(replies), replies)[0]
        total += sum(scores)
        best = max(scores)
        if reference_chosen and best < 1.0:
            reference = conversation.messages[-1]["content"]
            replies, scores, best = [reference, *replies], [1.0, *scores], 1.0
            stats.from_reference += 1
        winners = [r for r, s in zip(replies, scores) if s == best]
        losers = [r for r, s in sorted(zip(replies, scores), key=lambda x: x[1]) if s < best]
        if not losers:
            stats.all_best += best > 0
            stats.all_worse += best == 0
            continue
        for index in range(min(pairs_per_prompt, len(losers))):
            pairs.append(Pair(prompt, winners[index % len(winners)], losers[index], meta=conversation.meta,
                              source=conversation.source))
    stats.pairs, stats.mean_score = len(pairs), total / max(1, len(prompts) * k)
    return pairs, stats


def judge_prompt_ids(tokenizer: Any, prompt: str, a: str, b: str, criterion: str = "") -> list[int]:
    """The judge's question as chat-template ids ending where its reply (the letter) would start."""
    from ..tokenizer.chat_template import render_chat_ids

    text = JUDGE_TEMPLATE.format(criterion=f" {criterion}" if criterion else "", prompt=prompt, a=a, b=b)
    return render_chat_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)[0]


def letter_ids(tokenizer: Any) -> tuple[int, int]:
    """Token ids of "A" and "B" as a reply's first token."""
    ids = [tokenizer.encode(letter) for letter in ("A", "B")]
    if any(len(x) != 1 for x in ids):
        raise UserError("the judge's tokenizer does not encode 'A' and 'B' as single tokens; use another judge")
    return ids[0][0], ids[1][0]


@torch.no_grad()
def judge_preferences(judge: torch.nn.Module, tokenizer: Any, questions: list[tuple[str, str, str]],
                      criteria: list[str] | None = None, batch_size: int = 8) -> torch.Tensor:
    """For each (prompt, answer_1, answer_2): log p(1 better) - log p(2 better) from both orders.

    Returns float [N, 2]: column 0 asks with answer_1 as A, column 1 with answer_1 as B; each is
    the judge's "answer_1 wins" margin (logit of its letter minus the other letter's)."""
    a_id, b_id = letter_ids(tokenizer)
    criteria = criteria or [""] * len(questions)
    rows = []
    for (prompt, first, second), criterion in zip(questions, criteria):
        rows.append(judge_prompt_ids(tokenizer, prompt, first, second, criterion))
        rows.append(judge_prompt_ids(tokenizer, prompt, second, first, criterion))
    margins = []
    was_training = judge.training
    judge.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            last = torch.zeros_like(mask, dtype=torch.bool)
            last[torch.arange(len(chunk)), mask.sum(1) - 1] = True
            device = next(judge.parameters()).device
            logits = judge(ids.to(device), attention_mask=mask.to(device), logits_mask=last.to(device)).float()
            margins.append(logits[:, a_id] - logits[:, b_id])                  # [n]: A over B
    finally:
        judge.train(was_training)
    flat = torch.cat(margins).view(-1, 2).cpu()
    return torch.stack([flat[:, 0], -flat[:, 1]], dim=1)                       # answer_1 over answer_2, both orders


def verdicts(margins: torch.Tensor) -> list[int]:
    """+1: answer_1 preferred in both orders; -1: answer_2 in both; 0: a tie (the orders disagree)."""
    return [1 if a > 0 and b > 0 else -1 if a < 0 and b < 0 else 0 for a, b in margins.tolist()]


def ai_feedback_pairs(model: torch.nn.Module, judge: torch.nn.Module, judge_tokenizer: Any, tokenizer: Any,
                      prompts: list[list[dict[str, str]]], temperature: float = 1.0, max_new_tokens: int = 64,
                      seed: int = 0, criteria: list[str] | None = None) -> tuple[list[Pair], PairStats]:
    """Two sampled answers per prompt, judged in both orders; agreeing verdicts become pairs."""
    answers = sample_answers(model, tokenizer, prompts, 2, temperature, max_new_tokens, seed)
    questions = [(p[-1]["content"], a, b) for p, (a, b) in zip(prompts, answers)]
    stats = PairStats(prompts=len(prompts))
    pairs = []
    for prompt, (a, b), verdict in zip(prompts, answers, verdicts(judge_preferences(judge, judge_tokenizer, questions,
                                                                                     criteria))):
        if verdict == 0 or a == b:
            stats.ties += 1
            continue
        pairs.append(Pair(prompt, a if verdict > 0 else b, b if verdict > 0 else a))
    stats.pairs = len(pairs)
    return pairs, stats


def read_prompts(path: str) -> list[list[dict[str, str]]]:
    """A JSONL file of {"prompt": text or messages} (extra fields ignored) -> prompts as messages."""
    from .rewards import read_prompt_file

    return [prompt.messages for prompt in read_prompt_file(path)]


def log(message: str) -> None:
    print(message, file=sys.stderr)
