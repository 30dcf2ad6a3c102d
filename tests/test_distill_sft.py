"""Distillation in `lmforge sft`: the objective (CE / KD mixing, on-policy samples, prompts of packed rows),
the shrunk student, a tiny end-to-end run whose KD loss falls, and the vocabulary-mismatch paths."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from lmforge import cli
from lmforge.data.chat_batches import ChatExample, SFTBatches
from lmforge.errors import UserError
from lmforge.train.distill import (DistillConfig, DistillObjective, divergence, keep_first_layers, padded_batch,
                                   split_prompts)
from lmforge.train.losses import generalized_jsd, token_logprobs
from lmforge.train.objectives import SFTObjective

from train_support import VOCAB, make_shakespeare_shards, tiny_gpt, write_arithmetic_chats

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "train-shakespeare")[1]


def _sft_args(tokenizer_dir: str, data: Path, out_dir: Path, name: str, **extra) -> list[str]:
    settings = dict(model="nano", tokenizer=tokenizer_dir, data=data, out_dir=out_dir, name=name, seq_len=64,
                    batch_size=4, max_steps=6, lr=3e-3, warmup_steps=0, schedule="constant", log_interval=1,
                    eval_interval=0, checkpoint_interval=0, val_examples=8, eval_prompts=2, answer_tokens=4,
                    progress=False, peak_flops=1e12, eval_at_start=False)
    settings.update(extra)
    return ["sft", *(f"{key}={value}" for key, value in settings.items())]


@pytest.fixture(scope="module")
def teacher_run(tokenizer_dir, tmp_path_factory) -> Path:
    """A nano model fine-tuned on the arithmetic chats (the teacher every run below distils)."""
    root = tmp_path_factory.mktemp("distill-teacher")
    data = write_arithmetic_chats(root / "chats.jsonl")
    assert cli.main(_sft_args(tokenizer_dir, data, root, "teacher", max_steps=30)) == 0
    return root / "teacher"


def _examples() -> list[ChatExample]:
    """Three single-turn 'chats': a prompt (mask 0) and a reply (mask 1) of tokens < VOCAB."""
    return [ChatExample(list(range(1, 6)) + [20, 21, 22], [0] * 5 + [1] * 3),
            ChatExample([7, 8, 9, 30, 31], [0, 0, 0, 1, 1]),
            ChatExample([11, 12, 13, 14, 40, 41, 42, 43], [0] * 4 + [1] * 4)]


class _Context:
    """What DistillObjective.prepare uses of a TrainContext, around a plain model."""

    def __init__(self, policy: torch.nn.Module, teacher: torch.nn.Module) -> None:
        from lmforge.train.distributed import DistributedContext

        self.model, self.frozen, self.device = policy, {"teacher": teacher.eval()}, torch.device("cpu")
        self.distributed = DistributedContext()

    def autocast(self):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def policy(self):
        with torch.no_grad():
            yield self.model.eval()


# ------------------------------------------------------------------ the objective


def test_prompts_of_packed_rows_end_where_each_reply_starts():
    examples = _examples()
    batch = SFTBatches(examples, batch_size=2, seq_len=16, packing=True, shuffle=False).next_batch()
    prompts, end_ids = split_prompts(batch)
    # The prompt is the example up to (and including) the last token before its reply.
    expected = sorted(tuple(e.ids[:e.mask.index(1)]) for e in examples)
    assert sorted(map(tuple, prompts)) == expected
    assert sorted(end_ids) == sorted(e.ids[-1] for e in examples)     # each reply's final trained token


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_the_loss_mixes_cross_entropy_and_the_divergence_by_kd_ratio(loss):
    student, teacher = tiny_gpt(seed=0), tiny_gpt(seed=1)
    batch = SFTBatches(_examples(), batch_size=3, seq_len=16, packing=False, shuffle=False).next_batch()
    labelled = batch["labels"] != -100
    with torch.no_grad():
        teacher_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"])[labelled]
        student_logits = student(batch["input_ids"], attention_mask=batch["attention_mask"])[labelled]
    ce = -token_logprobs(student_logits, batch["labels"][labelled]).sum()
    for ratio in (0.0, 0.3, 1.0):
        config = DistillConfig(teacher="x", loss=loss, kd_ratio=ratio, beta=0.3, temperature=1.5)
        objective = DistillObjective(config, tokenizer=None, seq_len=16)
        objective.setup(_Context(student, teacher))   # lambda_ = 0: setup only takes the teacher
        prepared = objective.prepare(dict(batch), _Context(student, teacher))
        torch.testing.assert_close(prepared["teacher_logits"], teacher_logits)
        output = objective(student, prepared)
        kd = divergence(config, student_logits, teacher_logits).sum()
        torch.testing.assert_close(output.loss, (1 - ratio) * ce + ratio * kd, rtol=1e-5, atol=1e-5)
        assert objective.units(prepared) == int(labelled.sum())
    # kd_ratio 0 is exactly SFT's loss.
    plain = SFTObjective()(student, batch).loss
    zero = DistillObjective(DistillConfig(teacher="x", kd_ratio=0.0), None, 16)
    zero.setup(_Context(student, teacher))
    torch.testing.assert_close(zero(student, zero.prepare(dict(batch), _Context(student, teacher))).loss, plain)
    if loss == "jsd":    # and the JSD is GKD's (tested against TRL in test_distill_losses.py)
        torch.testing.assert_close(divergence(DistillConfig(beta=0.3, temperature=1.5), student_logits, teacher_logits),
                                   generalized_jsd(student_logits, teacher_logits, 0.3, 1.5))


def test_an_on_policy_batch_trains_on_the_students_own_samples(tokenizer_dir):
    from lmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    from lmforge.model import build_model, get_preset

    torch.manual_seed(0)
    student = build_model(get_preset("nano", vocab_size=tokenizer.vocab_size))
    teacher = build_model(get_preset("nano", vocab_size=tokenizer.vocab_size))
    batch = SFTBatches(_examples(), batch_size=3, seq_len=32, packing=True, shuffle=False).next_batch()
    objective = DistillObjective(DistillConfig(teacher="x", lambda_=1.0, max_new_tokens=5, sample_temperature=1.0),
                                 tokenizer, seq_len=32, seed=3)
    objective.setup(_Context(student, teacher))
    prepared = objective.prepare(dict(batch), _Context(student, teacher))
    assert prepared["on_policy"] and "document_ids" not in prepared          # a padded batch of prompt + sample
    prompts, _ = split_prompts(batch)
    labelled = prepared["labels"] != -100
    for row, prompt in enumerate(prompts):
        ids = prepared["input_ids"][row].tolist()
        assert ids[:len(prompt)] == prompt
        reply = prepared["labels"][row][labelled[row]].tolist()
        assert 1 <= len(reply) <= 6 and ids[len(prompt):len(prompt) + len(reply)] == reply
    # On-policy batches carry the divergence only (CE on the student's own samples would reinforce them).
    output = objective(student, prepared)
    torch.testing.assert_close(output.loss, output.metrics["kd"])
    assert objective.state_dict() == {"prepared": 1}
    # The coin is seeded: another objective with the same seed samples the same replies.
    again = DistillObjective(objective.config, tokenizer, seq_len=32, seed=3)
    again.setup(_Context(student, teacher))
    assert torch.equal(again.prepare(dict(batch), _Context(student, teacher))["input_ids"], prepared["input_ids"])


def test_padded_batch_labels_are_the_reply_shifted_by_one():
    batch = padded_batch([([1, 2, 3], [7, 8]), ([4], [9])], pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100], [9, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]


def test_a_shrunk_student_is_the_teachers_first_blocks():
    teacher = tiny_gpt(seed=0, n_layers=3)
    student = keep_first_layers(tiny_gpt(seed=0, n_layers=3), 1)
    assert student.config.n_layers == 1 and len(student.transformer.blocks) == 1
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, teacher.state_dict()[name])
    assert student(torch.randint(0, VOCAB, (2, 7))).shape == (2, 7, VOCAB)
    with pytest.raises(UserError, match="student_layers"):
        keep_first_layers(tiny_gpt(), 5)


# ------------------------------------------------------------------ lmforge sft end to end


def test_token_level_distillation_lowers_the_kd_loss(tokenizer_dir, teacher_run, tmp_path, capsys):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    args = _sft_args(tokenizer_dir, data, tmp_path, "student", max_steps=12, seed=7, **{
        "distill.teacher": teacher_run, "distill.loss": "jsd", "distill.beta": 0.5, "distill.kd_ratio": 0.5})
    assert cli.main(args) == 0
    assert "token-level KD" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    kd = [row["kd"] for row in rows if "kd" in row]
    assert len(kd) == 12 and kd[-1] < 0.7 * kd[0], kd
    saved = yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())
    assert saved["distill"]["teacher"] == str(teacher_run) and saved["distill"]["kd_ratio"] == 0.5
    # The student loads as a plain model; a shrunk one (1 of 2 layers) too.
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "shrunk", max_steps=2, model=teacher_run,
                              **{"distill.teacher": teacher_run, "distill.student_layers": 1})) == 0
    from lmforge.model.loading import load

    model, _ = load(tmp_path / "shrunk")
    assert model.config.n_layers == 1


def _other_tokenizer(root: Path):
    from lmforge.assets import shakespeare_play_files
    from lmforge.tokenizer import train_bpe

    return train_bpe([str(shakespeare_play_files()[-1])], vocab_size=300, num_workers=1)


def test_different_vocabularies_distil_at_sequence_level(tokenizer_dir, teacher_run, tmp_path, capsys):
    from lmforge.data.conversations import read_conversations
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.loading import load
    from lmforge.tokenizer.chat_template import render_chat_ids
    from lmforge.train.distill import TeacherAnswers
    from lmforge.train.distributed import DistributedContext

    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    student_tokenizer = _other_tokenizer(tmp_path)
    student_tokenizer.save(tmp_path / "student-tokenizer")
    args = _sft_args(str(tmp_path / "student-tokenizer"), data, tmp_path, "seq", max_steps=3,
                     **{"distill.teacher": teacher_run, "distill.max_new_tokens": 6})
    assert cli.main(args) == 0
    assert "sequence-level KD" in capsys.readouterr().err
    # The rewrite gives each training conversation the teacher's greedy answer (batched in the engine).
    teacher, teacher_tokenizer = load(teacher_run)
    conversations = read_conversations(data)[:5]
    rewritten = TeacherAnswers(teacher, teacher_tokenizer, 6, 64, DistributedContext())(conversations)
    for before, after in zip(conversations, rewritten):
        prompt, _ = render_chat_ids(teacher_tokenizer, before.messages[:-1], add_generation_prompt=True)
        [expected] = Engine(teacher, teacher_tokenizer).generate([prompt], SamplingParams(max_new_tokens=6))
        assert after.messages[:-1] == before.messages[:-1]
        assert after.messages[-1]["content"] == (expected.text.strip() or before.messages[-1]["content"])
    # Token-level KD across vocabularies is refused with one clear sentence.
    code = cli.main(args[:-1] + ["name=seq2", "distill.level=token"])
    assert code == 2 and "share a vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    ("distill.beta=2", "distill.beta"),
    ("distill.kd_ratio=-1", "distill.kd_ratio"),
    ("distill.loss=mse", "distill.loss"),
    ("distill.student_layers=9", "student_layers"),
])
def test_bad_distill_settings_are_one_clear_error(tokenizer_dir, teacher_run, tmp_path, capsys, bad, message):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    args = _sft_args(tokenizer_dir, data, tmp_path, "bad", **{"distill.teacher": teacher_run}) + [bad]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
