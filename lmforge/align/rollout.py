"""On-policy RL in the one Trainer: prompts in, sampled completions ("rollouts") out, reused for
several updates. GRPO, RLOO (align/grpo.py) and PPO (align/ppo.py) are `OnPolicyObjective`s.

One *generation* samples G completions for each of P prompts (N = P x G rows) from the live
policy, scores them, and is then trained on for `updates = num_iterations x steps_per_generation
x grad_accum` micro-batches: each pass over it (an iteration, PPO's epoch) shuffles its rows and
cuts them into `steps_per_generation x grad_accum` micro-batches of `batch_size` rows.

    prompts = PromptBatches(prompts, per_generation=P, updates=U, seed=0)   # the Trainer's batch source
    batch = prompts.next_batch()      # {"prompts": [P Prompt], "generation": g, "update": u}
    # objective.prepare(batch, ctx): on the first update of generation g, roll out and score
    # (no grad); every update returns its micro-batch of rows from that generation's buffer.

The batch source repeats a generation's prompts U times, so the Trainer's loop, resume and data
position stay what they are for every other objective; the buffer is part of the objective's
state, so a run resumed in the middle of a generation continues on the same rollouts.

Rows are right-padded [N, T] tensors: input_ids, attention_mask, and labels (the completion's
tokens at the positions that predict them, IGNORE_INDEX elsewhere; the end token is part of the
completion when the model stopped, so it learns to stop). Per-token quantities (log-probs,
values, advantages) are stored label-aligned in [N, T] tensors, 0 off the completion.
"""
from __future__ import annotations

import abc
import random
import time
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..train.losses import IGNORE_INDEX, token_logprobs
from ..train.objectives import Mean, Objective
from .rewards import Prompt, RewardFunctions


class PromptBatches:
    """The batch source of on-policy objectives: each generation's P prompts, `updates` times over.

    Prompts are drawn without replacement from a seeded shuffle, reshuffled every epoch; under
    several processes each takes its own P of every generation's P x world_size."""

    def __init__(self, prompts: list[Prompt], per_generation: int, updates: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(prompts) < per_generation * world_size:
            raise UserError(f"{len(prompts)} prompts are fewer than one generation's {per_generation} x "
                            f"{world_size} processes; add prompts or lower batch_size")
        self.prompts, self.per_generation, self.updates = prompts, per_generation, updates
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.generation, self.update = 0, 0
        self._orders: dict[int, list[int]] = {}

    def _prompt(self, k: int) -> Prompt:
        epoch, index = divmod(k, len(self.prompts))
        if epoch not in self._orders:
            order = list(range(len(self.prompts)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self.prompts[self._orders[epoch][index]]

    def next_batch(self) -> dict[str, Any]:
        start = (self.generation * self.world_size + self.rank) * self.per_generation
        batch = {"prompts": [self._prompt(k) for k in range(start, start + self.per_generation)],
                 "generation": self.generation, "update": self.update}
        self.update += 1
        if self.update == self.updates:
            self.generation, self.update = self.generation + 1, 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "update": self.update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generation, self.update = int(state["generation"]), int(state["update"])


def rollout_tensors(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int
                    ) -> dict[str, torch.Tensor]:
    """Right-padded rows prompt + completion: input_ids, attention_mask, labels [N, T], and
    prompt_lengths [N] (rows with equal prompts then run them once: model/shared_prefix.py)."""
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        n = len(prompt) + len(completion)
        ids[row, :n] = torch.tensor(prompt + completion)
        mask[row, :n] = 1
        labels[row, len(prompt) - 1:n - 1] = torch.tensor(completion)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_lengths": torch.tensor([len(p) for p in prompt_ids])}


def token_logps_and_hidden(model: nn.Module, rows: dict[str, torch.Tensor], hidden: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward: (log p of each completion token [M], its logits [M, V], the final hidden states
    at those positions [M, d] if `hidden`), in row-major order; the output layer runs only there.
    Rows that share a prompt (a GRPO group) run it once when `rows` has prompt_lengths."""
    from ..model.shared_prefix import predicted_logits

    predicted = rows["labels"] != IGNORE_INDEX
    logits, states = predicted_logits(model, rows["input_ids"], rows["attention_mask"], predicted,
                                      rows.get("prompt_lengths"))
    logps = token_logprobs(logits, rows["labels"][predicted])
    return logps, logits, states if hidden else None


def label_aligned(flat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Flat per-token values [M] back into label-aligned [N, T] (0 off the completion)."""
    out = torch.zeros(labels.shape, dtype=flat.dtype, device=flat.device)
    out[labels != IGNORE_INDEX] = flat
    return out


def select_rows(buffer: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `index` of every [N, ...] tensor in the buffer, cut to their longest row's width."""
    width = int(buffer["attention_mask"][index].sum(dim=1).max())
    return {key: (value[index][:, :width] if value.dim() == 2 and value.shape[1] == buffer["input_ids"].shape[1]
                  else value[index]) for key, value in buffer.items()}


class RolloutSampler:
    """Samples completions from a policy through lmforge's engine, kept for the whole run (its KV
    cache allocated once; the policy's weights change in place, so it samples from the current ones)."""

    def __init__(self, tokenizer: Any, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_rows: int = 64, max_prompt_tokens: int = 256, compile: bool = False,
                 ignore_eos: bool = False) -> None:
        self.tokenizer, self.max_new_tokens, self.temperature = tokenizer, max_new_tokens, temperature
        self.ignore_eos = ignore_eos          # benchmarks: every completion max_new_tokens long
        self.top_p, self.top_k, self.max_rows, self.max_prompt_tokens = top_p, top_k, max_rows, max_prompt_tokens
        self.compile = compile
        self._engine: Any = None

    def engine(self, policy: nn.Module) -> Any:
        from ..infer.engine import Engine

        if self._engine is None or self._engine.model is not policy:
            context = min(policy.config.max_seq_len, self.max_prompt_tokens + self.max_new_tokens)
            self._engine = Engine(policy, self.tokenizer, max_batch_size=self.max_rows, max_seq_len=context,
                                  context_policy="error", compile=self.compile)
        return self._engine

    def sample(self, policy: nn.Module, prompts: list[Prompt], group_size: int, seed: int,
               temperature: float | None = None) -> tuple[list[list[int]], list[list[int]], list[str], list[bool]]:
        """group_size completions per prompt, all in one engine batch (continuous batching; a prompt's
        group is prefilled once and its KV rows copied). Returns (prompt ids, completion ids with the
        end token when it stopped, texts, stopped) per row, groups contiguous. temperature 0: greedy."""
        from ..infer.sampling import SamplingParams
        from ..tokenizer.chat_template import render_chat_ids

        temperature = self.temperature if temperature is None else temperature
        ids = [render_chat_ids(self.tokenizer, p.messages, add_generation_prompt=True)[0] for p in prompts]
        too_long = next((p for p, x in zip(prompts, ids) if len(x) > self.max_prompt_tokens), None)
        if too_long is not None:
            raise UserError(f"prompt '{too_long.source}' has more than max_prompt_tokens={self.max_prompt_tokens} "
                            "tokens; raise max_prompt_tokens or shorten the prompts")
        engine = self.engine(policy)
        group = engine.new_group()
        sequences = [engine.submit(prompt, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=temperature,
                                                          top_p=self.top_p, top_k=self.top_k,
                                                          ignore_eos=self.ignore_eos, seed=seed * 1_000_003 + i * group_size + j), group=group)
                     for i, prompt in enumerate(ids) for j in range(group_size)]
        while not all(s.finished for s in sequences):
            engine.step()
        for sequence in sequences:
            sequence.raise_if_failed()
        completions = [s.token_ids + ([s.stop_token_id] if s.stop_token_id is not None else []) for s in sequences]
        return ([s.prompt_ids for s in sequences], completions, [s.text.text for s in sequences],
                [s.stop_token_id is not None for s in sequences])


class OnPolicyObjective(Objective):
    """The shared machinery of GRPO, RLOO and PPO: rollouts, rewards, buffer, micro-batches.

    Subclasses implement `score(buffer, ctx)` (add advantages etc. to the buffer, no grad; return
    generation metrics) and `__call__` (the loss on a micro-batch). Frozen models: ctx.frozen
    ["reference"] (or, with LoRA and no reference, the base with adapters off) when `needs_reference`.
    """

    needs_reference = False

    def __init__(self, tokenizer: Any, rewards: RewardFunctions | None, *, group_size: int, batch_size: int,
                 steps_per_generation: int = 1, grad_accum: int = 1, num_iterations: int = 1,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, rollout_batch_size: int = 64, compile_rollouts: bool = False,
                 max_prompt_tokens: int = 256, ignore_eos: bool = False) -> None:
        self.tokenizer, self.rewards, self.group_size, self.batch_size = tokenizer, rewards, group_size, batch_size
        self.chunks = steps_per_generation * grad_accum                 # micro-batches per pass over a generation
        self.num_iterations, self.max_new_tokens, self.seed = num_iterations, max_new_tokens, seed
        self.sampler = RolloutSampler(tokenizer, max_new_tokens, temperature, top_p, top_k,
                                      min(rollout_batch_size, batch_size * self.chunks), max_prompt_tokens,
                                      compile_rollouts, ignore_eos)
        self.buffer: dict[str, torch.Tensor] | None = None
        self.buffer_generation = -1
        self.generation_metrics: dict[str, float] = {}
        self.reference: nn.Module | None = None
        self.ctx: Any = None

    @property
    def rows_per_generation(self) -> int:
        return self.batch_size * self.chunks

    @property
    def prompts_per_generation(self) -> int:
        return self.rows_per_generation // self.group_size

    @property
    def updates_per_generation(self) -> int:
        return self.chunks * self.num_iterations

    @property
    def off_policy(self) -> bool:
        """Whether a micro-batch can meet weights other than those that sampled it (then the
        sampling policy's log-probs are stored; on-policy, they equal the detached current ones)."""
        return self.updates_per_generation > 1

    def setup(self, ctx: Any) -> None:
        from ..peft.lora import has_lora

        self.ctx = ctx
        if ctx.distributed.is_distributed and ctx.trainer.config.distributed == "fsdp":
            raise UserError("rollouts need the whole policy on every process; use distributed=ddp for GRPO/RLOO/PPO")
        self.reference = ctx.frozen.get("reference")
        if self.needs_reference and self.reference is None and not has_lora(ctx.trainer.raw):
            raise UserError("a KL penalty needs a reference: give reference=MODEL, train LoRA adapters (the base "
                            "with adapters off is then the reference), or set beta=0")

    def units(self, batch: dict[str, Any]) -> float:
        return float(batch["units"])

    def tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())

    # ------------------------------------------------------------------ rollouts

    def per_token_logps(self, model: nn.Module, buffer: dict[str, torch.Tensor], ctx: Any, reference: bool = False,
                        value_head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Label-aligned log-probs [N, T] of the buffer's completions under the policy (or the
        reference: the frozen model, or the policy with its adapters off), batch_size rows at a
        time; with `value_head`, also the policy's values [N, T] from the same forward."""
        from .preference import adapters_disabled

        labels = buffer["labels"]
        logps_out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        values_out = torch.zeros_like(logps_out) if value_head is not None else None
        for start in range(0, labels.shape[0], self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, labels.shape[0]), device=labels.device)
            rows = select_rows(buffer, index)
            width = rows["labels"].shape[1]
            with ctx.autocast():
                if reference and self.reference is not None:
                    logps, _, hidden = token_logps_and_hidden(self.reference, rows)
                elif reference:
                    with adapters_disabled(model):
                        logps, _, hidden = token_logps_and_hidden(model, rows)
                else:
                    logps, _, hidden = token_logps_and_hidden(model, rows, hidden=value_head is not None)
            logps_out[index, :width] = label_aligned(logps.float(), rows["labels"])
            if values_out is not None:
                values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
                values_out[index, :width] = label_aligned(values, rows["labels"])
        return logps_out, values_out

    def roll_out(self, prompts: list[Prompt], generation: int, ctx: Any) -> dict[str, torch.Tensor]:
        """Sample, score and prepare one generation's buffer (no grad)."""
        started = time.perf_counter()
        seed = (self.seed * 7919 + generation) * 64 + ctx.distributed.rank
        with ctx.policy() as policy:
            prompt_ids, completions, texts, stopped = self.sampler.sample(policy, prompts, self.group_size, seed)
        generated = time.perf_counter() - started
        from .data import pad_id_of

        buffer = rollout_tensors(prompt_ids, completions, pad_id_of(self.tokenizer))
        buffer = {key: value.to(ctx.device) for key, value in buffer.items()}
        rows_prompts = [p for p in prompts for _ in range(self.group_size)]
        buffer["stopped"] = torch.tensor(stopped, device=ctx.device)
        if self.rewards is not None:
            totals, per_function = self.rewards(rows_prompts, texts)
            buffer["rewards"] = torch.tensor(totals, dtype=torch.float32, device=ctx.device)
            verifiable = self.rewards.verifiable
            if verifiable is not None:
                buffer["correct"] = torch.tensor([s >= 1.0 for s in per_function[verifiable]], device=ctx.device)
        with ctx.policy() as policy:
            self.policy_statistics(policy, buffer, ctx)
            if self.needs_reference:
                buffer["ref_logps"] = self.per_token_logps(policy, buffer, ctx, reference=True)[0]
            metrics = self.score(buffer, prompts, texts, ctx, policy)
        self.generation_metrics = {"generate_s": generated, "rollout_s": time.perf_counter() - started, **metrics}
        self.last_texts = texts
        return buffer

    def policy_statistics(self, policy: nn.Module, buffer: dict[str, torch.Tensor], ctx: Any) -> None:
        """What the sampling policy's forward must record (no grad): its log-probs when off-policy."""
        if self.off_policy:
            buffer["old_logps"] = self.per_token_logps(policy, buffer, ctx)[0]

    @abc.abstractmethod
    def score(self, buffer: dict[str, torch.Tensor], prompts: list[Prompt], texts: list[str], ctx: Any,
              policy: nn.Module) -> dict[str, float]:
        """Add the method's advantages (and anything else its loss needs) to the buffer."""

    # ------------------------------------------------------------------ micro-batches

    def prepare(self, batch: dict[str, Any], ctx: Any) -> dict[str, Any]:
        generation, update = int(batch["generation"]), int(batch["update"])
        fresh = generation != self.buffer_generation
        if fresh:
            self.buffer = self.roll_out(batch["prompts"], generation, ctx)
            self.buffer_generation = generation
        iteration, chunk = divmod(update, self.chunks)
        order = torch.randperm(self.rows_per_generation,
                               generator=torch.Generator().manual_seed(self.seed * 1_000_003 + generation * 101 + iteration))
        index = order[chunk * self.batch_size:(chunk + 1) * self.batch_size].to(ctx.device)
        rows = select_rows(self.buffer, index)
        rows["units"] = self.micro_batch_units(rows)
        # Generation-level figures ride on the first micro-batch of the generation (Mean with count 1);
        # the others report count 0, so each is averaged over the generations of the logged steps.
        count = 1.0 if fresh and update == 0 else 0.0
        rows["generation_metrics"] = {name: Mean(value * count, count) for name, value in self.generation_metrics.items()}
        return rows

    @abc.abstractmethod
    def micro_batch_units(self, rows: dict[str, torch.Tensor]) -> float:
        """The units a micro-batch's summed loss is over (known before its forward)."""

    def row_metrics(self, rows: dict[str, Any]) -> dict[str, Mean]:
        """Per-row figures of a micro-batch (each row counted once per update it is trained on)."""
        n = rows["input_ids"].shape[0]
        lengths = (rows["labels"] != IGNORE_INDEX).sum(dim=1).float()
        metrics = {"completion_length": Mean(lengths.sum(), n),
                   "stopped": Mean(rows["stopped"].float().sum(), n), **rows["generation_metrics"]}
        if "rewards" in rows:
            metrics["reward"] = Mean(rows["rewards"].sum(), n)
        if "correct" in rows:
            metrics["accuracy"] = Mean(rows["correct"].float().sum(), n)
        return metrics

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"buffer_generation": self.buffer_generation}
        if self.buffer is not None:
            state["buffer"] = {key: value.cpu() for key, value in self.buffer.items()}
            state["generation_metrics"] = dict(self.generation_metrics)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_generation = int(state.get("buffer_generation", -1))
        if state.get("buffer") is not None:
            device = self.ctx.device if self.ctx is not None else "cpu"
            self.buffer = {key: value.to(device) for key, value in state["buffer"].items()}
            self.generation_metrics = dict(state.get("generation_metrics", {}))
