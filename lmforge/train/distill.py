"""Knowledge distillation in `lmforge sft`: a frozen teacher, a smaller student, one Trainer.

    lmforge sft --config distill-smollm2-countdown                      # the recipe
    lmforge sft model=... distill.teacher=smollm2-135m-instruct distill.loss=jsd distill.beta=0.5 \\
        distill.kd_ratio=0.5 distill.lambda_=0.0 distill.student_layers=10

Two ways, chosen by the vocabularies (tokenizer fingerprints):

* token-level (same vocabulary): `DistillObjective` matches the student's next-token distribution
  to the teacher's at every trained position, mixed with the usual cross-entropy:
      loss = (1 - kd_ratio) * CE(labels) + kd_ratio * D(student, teacher)
  with D = forward KL (teacher || student), reverse KL (student || teacher) or GKD's generalised
  JSD(beta) (train/losses.py). With probability `lambda_` a micro-batch's responses are first
  sampled from the student itself (on-policy, as in GKD: the student learns from the teacher on
  the mistakes it actually makes); those batches carry the divergence only, since cross-entropy
  on the student's own samples would just reinforce them.
* sequence-level (different vocabularies: logits cannot be compared token by token): the teacher
  answers the training prompts once before training (greedy, batched through the engine, shared
  across processes) and the student is fine-tuned on those answers with plain SFT (Kim & Rush 2016).

The teacher is a frozen model handed to the Trainer (`frozen_models={"teacher": ...}`): on the
device, eval mode, no grad, broadcast under DDP and sharded under FSDP like the student.
`student_layers=N` keeps the student's first N blocks (a shallower copy of a pretrained model,
initialised from its lower layers, as DistilBERT does with every other layer).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch
from torch import nn

from ..errors import UserError
from .losses import IGNORE_INDEX, forward_kl, generalized_jsd, labelled_positions, reverse_kl, token_logprobs
from .objectives import Metric, ObjectiveOutput, SFTObjective, model_inputs

if TYPE_CHECKING:
    from .context import TrainContext


@dataclass
class DistillConfig:
    """`distill.*` keys of `lmforge sft` (distillation is on when `teacher` is set)."""

    teacher: str | None = None                 # any lmforge.load reference (bundled name, run dir, HF dir, .gguf)
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "jsd"
    beta: float = 0.5                          # JSD mixture weight (0 = forward KL, 1 = reverse KL), as in GKD
    temperature: float = 1.0                   # softens both distributions before the divergence
    kd_ratio: float = 0.5                      # loss = (1 - kd_ratio) CE + kd_ratio KD
    lambda_: float = 0.0                       # fraction of micro-batches whose responses the student samples
    sample_temperature: float = 1.0            # sampling temperature of those on-policy responses
    max_new_tokens: int = 64                   # length of on-policy samples and teacher answers
    level: Literal["auto", "token", "sequence"] = "auto"   # auto: token-level iff the vocabularies match
    student_layers: int | None = None          # keep only the student's first N transformer blocks

    def validate(self) -> "DistillConfig":
        checks = [
            (0.0 <= self.beta <= 1.0, f"distill.beta must be in [0, 1], not {self.beta}"),
            (self.temperature > 0, f"distill.temperature must be > 0, not {self.temperature}"),
            (0.0 <= self.kd_ratio <= 1.0, f"distill.kd_ratio must be in [0, 1], not {self.kd_ratio}"),
            (0.0 <= self.lambda_ <= 1.0, f"distill.lambda_ must be in [0, 1], not {self.lambda_}"),
            (self.sample_temperature >= 0, "distill.sample_temperature must be >= 0"),
            (self.max_new_tokens >= 1, "distill.max_new_tokens must be at least 1"),
            (self.student_layers is None or self.student_layers >= 1, "distill.student_layers must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"{message}; fix the config")
        return self


def divergence(config: DistillConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The configured per-position divergence: [N, V] x [N, V] -> [N]."""
    if config.loss == "forward_kl":
        return forward_kl(student_logits, teacher_logits, config.temperature)
    if config.loss == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, config.temperature)
    return generalized_jsd(student_logits, teacher_logits, config.beta, config.temperature)


class DistillObjective(SFTObjective):
    """Token-level KD on the trained positions (SFT's labels), mixed with cross-entropy.

    Batch (SFTBatches): input_ids, labels, attention_mask [B, T], packed rows also position_ids,
    document_ids. `prepare` adds teacher_logits [N, V] at the N labelled positions (and, on an
    on-policy micro-batch, first replaces the batch by prompts + the student's own samples).
    Metrics: accuracy, ce (cross-entropy) and kd (the divergence), all per trained token.
    """

    def __init__(self, config: DistillConfig, tokenizer: Any, seq_len: int, seed: int = 0) -> None:
        self.config, self.tokenizer, self.seq_len, self.seed = config, tokenizer, seq_len, seed
        self.prepared = 0          # micro-batches prepared so far: the on-policy coin's position (resumed)

    def setup(self, ctx: "TrainContext") -> None:
        self.teacher = ctx.frozen["teacher"]
        if self.config.lambda_ > 0 and ctx.distributed.is_distributed and ctx.trainer.config.distributed == "fsdp":
            # Ranks sample replies of different lengths, so their sharded forwards would not line up.
            raise UserError("distill.lambda_ > 0 (on-policy samples) does not work with distributed=fsdp; "
                            "use distributed=ddp or distill.lambda_=0")

    def on_policy_now(self) -> bool:
        """The coin for this micro-batch: seeded by (seed, count), so every process agrees."""
        coin = random.Random(self.seed * 1_000_003 + self.prepared).random()
        self.prepared += 1
        return coin < self.config.lambda_

    def prepare(self, batch: dict[str, Any], ctx: "TrainContext") -> dict[str, Any]:
        if self.config.lambda_ > 0 and self.on_policy_now():
            batch = self.sample_from_student(batch, ctx)
        with ctx.autocast():
            batch["teacher_logits"] = self.teacher(batch["input_ids"], **model_inputs(batch),
                                                   logits_mask=labelled_positions(batch["labels"])).float()
        return batch

    def sample_from_student(self, batch: dict[str, Any], ctx: "TrainContext") -> dict[str, Any]:
        """Prompts of the batch's examples + the student's sampled replies, as a padded batch whose
        labels are the sampled tokens (an example's prompt ends where its last trained reply begins)."""
        from ..infer.engine import Engine
        from ..infer.sampling import SamplingParams

        prompts, end_ids = split_prompts(batch)
        budget = min(self.config.max_new_tokens, self.seq_len - max(len(p) for p in prompts) - 1)
        if budget < 1:
            return batch                  # no room left for a reply: keep the ground truth
        params = SamplingParams(max_new_tokens=budget, temperature=self.config.sample_temperature,
                                seed=self.seed * 1_000_003 + self.prepared)
        with ctx.policy() as policy:
            engine = Engine(policy, self.tokenizer, max_batch_size=len(prompts), max_seq_len=self.seq_len)
            results = engine.generate(prompts, params)
        rows = []
        for prompt, result, end_id in zip(prompts, results, end_ids):
            reply = list(result.token_ids) + ([end_id] if result.finish_reason == "stop" else [])
            rows.append((prompt, reply))
        pad_id = next((t for t in (getattr(self.tokenizer, "pad_id", None), getattr(self.tokenizer, "eot_id", None))
                       if isinstance(t, int)), 0)
        return padded_batch(rows, pad_id, ctx.device, marked_on_policy=True)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        labels = batch["labels"]
        predicted = labelled_positions(labels)
        output = model(batch["input_ids"], **model_inputs(batch), logits_mask=predicted, return_output=True)
        logits, targets = output.logits, labels[predicted]                   # [N, V], [N]
        teacher_logits = batch["teacher_logits"]
        if teacher_logits.shape != logits.shape:
            raise UserError(f"the teacher's logits are {tuple(teacher_logits.shape)} but the student's "
                            f"{tuple(logits.shape)}; the two models need the same vocabulary for token-level KD "
                            "(set distill.level=sequence)")
        ce = -token_logprobs(logits, targets).sum()
        kd = divergence(self.config, logits, teacher_logits).sum()
        ratio = 1.0 if batch.get("on_policy") else self.config.kd_ratio
        loss = (1 - ratio) * ce + ratio * kd
        with torch.no_grad():
            correct = (logits.argmax(dim=-1) == targets).sum().float()
        metrics: dict[str, Metric] = {"accuracy": correct, "ce": ce.detach(), "kd": kd.detach()}
        if output.aux_loss is not None and model.training:
            loss = loss + output.aux_loss * predicted.sum()
        return ObjectiveOutput(loss, metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"prepared": self.prepared}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prepared = int(state.get("prepared", 0))


def split_prompts(batch: dict[str, Any]) -> tuple[list[list[int]], list[int]]:
    """Each example's prompt (its tokens up to where its last trained reply starts) and that reply's
    final label (the end-of-turn token), from a packed or padded SFT batch."""
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    documents = batch.get("document_ids")
    documents = documents.cpu() if documents is not None else batch["attention_mask"].cpu().long() - 1
    prompts, end_ids = [], []
    for row in range(ids.shape[0]):
        for document in documents[row].unique().tolist():
            if document < 0:
                continue                                     # padding
            where = (documents[row] == document).nonzero()[:, 0]
            doc_ids, doc_labels = ids[row, where], labels[row, where]
            trained = (doc_labels != IGNORE_INDEX).nonzero()[:, 0]
            if len(trained) == 0:
                continue
            # labels[t] = ids[t + 1]: the last span of trained labels starts predicting at `start`.
            gaps = (trained[1:] - trained[:-1] != 1).nonzero()[:, 0]
            start = int(trained[gaps[-1] + 1] if len(gaps) else trained[0])
            prompts.append(doc_ids[:start + 1].tolist())
            end_ids.append(int(doc_labels[trained[-1]]))
    if not prompts:
        raise UserError("an on-policy micro-batch has no trained reply to sample again; check the data")
    return prompts, end_ids


def padded_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device,
                 marked_on_policy: bool = False) -> dict[str, Any]:
    """(prompt, reply) token lists -> a right-padded batch training on the replies:
    input_ids, labels, attention_mask [B, T] (labels[t] = ids[t + 1] inside the reply)."""
    width = max(len(prompt) + len(reply) for prompt, reply in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros_like(input_ids)
    for r, (prompt, reply) in enumerate(rows):
        sequence = prompt + reply
        input_ids[r, :len(sequence)] = torch.tensor(sequence)
        mask[r, :len(sequence)] = 1
        if reply:
            labels[r, len(prompt) - 1:len(sequence) - 1] = torch.tensor(reply)
    batch: dict[str, Any] = {"input_ids": input_ids.to(device), "labels": labels.to(device),
                             "attention_mask": mask.to(device)}
    if marked_on_policy:
        batch["on_policy"] = True
    return batch


# ---------------------------------------------------------------- wiring into `lmforge sft`


@dataclass
class DistillPlan:
    """What `sft` does differently when distilling."""

    level: Literal["token", "sequence"]
    teacher: nn.Module
    teacher_tokenizer: Any
    frozen_models: dict[str, nn.Module]                                   # Trainer(frozen_models=...)
    rewrite: Callable[[list[Any]], list[Any]] | None = None               # sequence-level: teacher answers

    def describe(self, config: Any) -> str:
        settings: DistillConfig = config.distill
        teacher = f"distill: teacher {settings.teacher} ({sum(p.numel() for p in self.teacher.parameters()) / 1e6:.1f}M)"
        if self.level == "sequence":
            return (f"{teacher}, different vocabulary: sequence-level KD (SFT on the teacher's greedy answers, "
                    f"{settings.max_new_tokens} tokens at most)")
        loss = settings.loss + (f"(beta={settings.beta})" if settings.loss == "jsd" else "")
        return (f"{teacher}, same vocabulary: token-level KD, loss = {1 - settings.kd_ratio:g} CE + "
                f"{settings.kd_ratio:g} {loss} at T={settings.temperature:g}, on-policy fraction {settings.lambda_:g}")


def keep_first_layers(model: nn.Module, n_layers: int) -> nn.Module:
    """The model with only its first `n_layers` transformer blocks (embeddings, final norm and head kept)."""
    blocks = model.transformer.blocks
    if n_layers > len(blocks):
        raise UserError(f"distill.student_layers={n_layers} but the student has only {len(blocks)} layers; "
                        "lower distill.student_layers")
    model.transformer.blocks = nn.ModuleList(list(blocks)[:n_layers])
    model.config = dataclasses.replace(model.config, n_layers=n_layers)
    model.transformer.config = model.config
    return model


def same_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any) -> bool:
    """True when token ids mean the same strings in both (tokenizer fingerprints: vocab, merges, specials)."""
    try:
        return student_tokenizer.fingerprint() == teacher_tokenizer.fingerprint()
    except AttributeError:
        return False


def plan_distillation(config: Any, model: nn.Module, tokenizer: Any, context: Any) -> DistillPlan | None:
    """Shrink the student if asked (in place), load the teacher and choose token- or sequence-level
    KD; None without a teacher (a shrunk student alone is the no-KD baseline).

    config: an SFTConfig (its `distill` settings); model/tokenizer: the student's."""
    from ..model.loading import load

    settings: DistillConfig = config.distill
    if settings.student_layers is not None:
        keep_first_layers(model, settings.student_layers)
    if not settings.teacher:
        return None
    teacher, teacher_tokenizer = load(settings.teacher)
    if getattr(teacher.config, "arch", "gpt") != "gpt":
        raise UserError(f"distill.teacher '{settings.teacher}' is a BERT (masked LM); the teacher must be a causal LM")
    matching = teacher_tokenizer is not None and same_vocabulary(tokenizer, teacher_tokenizer)
    if matching and teacher.config.vocab_size != model.config.vocab_size:
        matching = False           # same tokenizer, differently padded output layers: no token-level match
    level = settings.level if settings.level != "auto" else ("token" if matching else "sequence")
    if level == "token" and not matching:
        raise UserError(f"distill.level=token needs the teacher '{settings.teacher}' and the student "
                        f"'{config.model}' to share a vocabulary, and their tokenizers differ; "
                        "use distill.level=sequence (or auto)")
    if level == "sequence" and teacher_tokenizer is None:
        raise UserError(f"distill.teacher '{settings.teacher}' has no tokenizer to write its answers with; "
                        "use a teacher with a tokenizer")
    teacher = teacher.float()
    if level == "token":
        return DistillPlan("token", teacher, teacher_tokenizer, {"teacher": teacher})
    rewrite = TeacherAnswers(teacher, teacher_tokenizer, settings.max_new_tokens, config.seq_len, context)
    return DistillPlan("sequence", teacher, teacher_tokenizer, {}, rewrite)


class TeacherAnswers:
    """Sequence-level KD's data: each training conversation's last assistant reply replaced by the
    teacher's greedy answer. Processes answer every world_size-th conversation, then share them."""

    def __init__(self, teacher: nn.Module, tokenizer: Any, max_new_tokens: int, seq_len: int, context: Any) -> None:
        self.teacher, self.tokenizer, self.context = teacher, tokenizer, context
        self.max_new_tokens, self.seq_len = max_new_tokens, seq_len
        self.answered = 0

    def __call__(self, conversations: list[Any]) -> list[Any]:
        from ..infer.engine import Engine, eval_mode
        from ..infer.sampling import SamplingParams
        from ..tokenizer.chat_template import render_chat_ids

        context = self.context
        mine = list(range(len(conversations)))[context.rank::context.world_size]
        prompts = []
        for index in mine:
            messages = conversations[index].messages
            last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
            ids, _ = render_chat_ids(self.tokenizer, messages[:last], add_generation_prompt=True)
            prompts.append(ids)          # a prompt too long for seq_len loses its start (the engine's policy)
        teacher = self.teacher.to(context.device)
        engine = Engine(teacher, self.tokenizer, max_batch_size=32, max_seq_len=self.seq_len)
        with torch.no_grad(), eval_mode(teacher):
            results = engine.generate(prompts, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0,
                                                              seed=0)) if prompts else []
        answers: dict[int, str] = {}
        for part in context.gather_objects({index: result.text.strip() for index, result in zip(mine, results)}):
            answers.update(part)
        rewritten = []
        for index, conversation in enumerate(conversations):
            messages = [dict(message) for message in conversation.messages]
            last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
            messages[last]["content"] = answers[index] or messages[last]["content"]   # an empty answer: keep the data's
            rewritten.append(dataclasses.replace(conversation, messages=messages[:last + 1]))
        self.answered = len(answers)
        return rewritten
