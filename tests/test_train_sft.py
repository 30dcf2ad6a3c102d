"""SFT: packing, truncation, resumable batches, the objective on packed rows, and `lmforge sft` end to end
(run directory, report, resume exactness, the result loading in lmforge and transformers, bad input)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmforge import cli
from lmforge.data.chat_batches import ChatExample, SFTBatches, example_labels, fit_examples, pack_best_fit
from lmforge.errors import UserError
from lmforge.train.objectives import SFTObjective

from train_support import VOCAB, make_shakespeare_shards, tiny_gpt, write_arithmetic_chats

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "train-shakespeare")[1]


def _sft_args(tokenizer_dir: str, data: Path, out_dir: Path, name: str, **extra) -> list[str]:
    settings = dict(model="nano", tokenizer=tokenizer_dir, data=data, out_dir=out_dir, name=name, seq_len=64,
                    batch_size=4, max_steps=6, lr=3e-3, warmup_steps=0, schedule="constant", log_interval=1,
                    eval_interval=3, checkpoint_interval=3, val_examples=8, eval_prompts=4, answer_tokens=4,
                    progress=False, peak_flops=1e12)
    settings.update(extra)
    return ["sft", *(f"{key}={value}" for key, value in settings.items())]


# ------------------------------------------------------------------ batching


def test_best_fit_packing_fills_rows_without_splitting_or_losing_examples():
    lengths = [7, 3, 9, 1, 4, 4, 6, 2, 10, 5]
    rows = pack_best_fit(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 6                      # 51 tokens: 6 rows is the best possible with 10 per row
    assert rows == pack_best_fit(lengths, capacity=10)
    with pytest.raises(ValueError):
        pack_best_fit([11], capacity=10)


def test_truncation_keeps_whole_replies_and_reports_what_it_did():
    # two assistant spans: tokens 2-3 and 6-7 (each ending in its stop token)
    example = ChatExample(list(range(10)), [0, 0, 1, 1, 0, 0, 1, 1, 0, 0])
    fitted, report = fit_examples([example, ChatExample([1, 2], [0, 1])], seq_len=7)
    assert fitted[0].ids == [0, 1, 2, 3] and fitted[0].mask == [0, 0, 1, 1]   # cut after the first reply
    assert (report.kept, report.truncated, report.dropped) == (1, 1, 0)
    _, report = fit_examples([example, ChatExample([1, 2], [0, 1])], seq_len=3)
    assert report.dropped == 1 and "1 dropped" in report.describe()
    with pytest.raises(UserError, match="raise seq_len"):
        fit_examples([example], seq_len=2)
    assert example_labels(ChatExample([5, 6, 7, 8], [0, 1, 1, 0])) == [6, 7, -100, -100]


def _examples(n: int = 23) -> list[ChatExample]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=generator))
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        out.append(ChatExample(ids, [0] * (length // 2) + [1] * (length - length // 2)))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_batches_are_seeded_resumable_and_split_evenly_across_ranks(packing):
    examples = _examples()
    source = SFTBatches(examples, batch_size=3, seq_len=16, packing=packing, seed=4)
    for _ in range(5):
        source.next_batch()
    state = source.state_dict()
    expected = [source.next_batch() for _ in range(6)]          # crosses an epoch boundary
    restored = SFTBatches(examples, batch_size=3, seq_len=16, packing=packing, seed=4)
    restored.load_state_dict(state)
    for a, b in zip(expected, (restored.next_batch() for _ in range(6))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ranks = [SFTBatches(examples, batch_size=2, seq_len=16, packing=packing, seed=4, rank=r, world_size=2)
             for r in range(2)]
    assert ranks[0].rows_per_epoch == ranks[1].rows_per_epoch
    assert not set(ranks[0]._order) & set(ranks[1]._order)
    batch = expected[0]
    if packing:
        assert {"position_ids", "document_ids"} <= set(batch)
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max()) <= 16
        assert (batch["document_ids"] >= 0).sum() == batch["attention_mask"].sum()
    else:
        assert "document_ids" not in batch and batch["input_ids"].shape[1] <= 11


def test_a_packed_batch_has_exactly_the_loss_of_its_examples_alone():
    """No cross-attention and no label across examples: the packed loss is the sum of each example's."""
    model = tiny_gpt().eval()
    examples = _examples(6)
    packed = SFTBatches(examples, batch_size=2, seq_len=32, packing=True, shuffle=False)
    objective = SFTObjective()
    with torch.no_grad():
        packed_loss = sum(objective(model, batch).loss for batch in packed.iter_fixed())
        alone = SFTBatches(examples, batch_size=1, seq_len=32, packing=False, shuffle=False)
        separate = sum(objective(model, batch).loss for batch in alone.iter_fixed())
    assert sum(objective.units(b) for b in packed.iter_fixed()) == sum(sum(e.mask[1:]) for e in examples)
    # Throughput counts real tokens, not the padding at the end of each row.
    batch = next(packed.iter_fixed())
    assert objective.tokens(batch) == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
    torch.testing.assert_close(packed_loss, separate, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------ lmforge sft


def test_sft_command_end_to_end(tokenizer_dir, tmp_path, capsys):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "run", max_steps=30, eval_interval=15,
                              checkpoint_interval=15)) == 0
    out = capsys.readouterr()
    run = tmp_path / "run"
    assert "report:" in out.out and "packed rows" in out.err
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "config.json", "report.md", "report.json",
                 "curves.png", "samples.jsonl", "tokenizer/tokenizer_config.json"):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert report["before"]["val_loss"] > report["after"]["val_loss"] + 1.0
    assert set(report["answers"]) == {"0", "15", "30"} and len(report["answers"]["30"]) == 4
    assert "| val_loss |" in (run / "report.md").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]          # the base model, evaluated first
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == str(data)

    # The result is a model lmforge loads (with the chat template), and transformers too.
    from lmforge.model.loading import export, load

    model, tokenizer = load(run)
    assert tokenizer.chat_template and model.config.vocab_size == tokenizer.vocab_size
    hf_dir = export(model, tokenizer, tmp_path / "hf", "hf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    from lmforge.tokenizer.chat_template import render_chat_ids

    assert list(prompt["input_ids"]) == render_chat_ids(tokenizer, messages, add_generation_prompt=True)[0]
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([prompt["input_ids"]])
    torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-4, rtol=1e-4)


def test_sft_resume_is_exact(tokenizer_dir, tmp_path):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "straight")) == 0
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "resumed", max_steps=3)) == 0
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "resumed") + ["--resume"]) == 0
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    losses = {run: [json.loads(line).get("loss") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("straight", "resumed")}
    assert [x for x in losses["straight"] if x is not None] == [x for x in losses["resumed"] if x is not None]
    # The resumed session's report still compares with the base model evaluated in the first session.
    reports = {run: json.loads((tmp_path / run / "report.json").read_text()) for run in ("straight", "resumed")}
    assert reports["resumed"]["before"] == reports["straight"]["before"] and reports["resumed"]["before"]


def test_sft_on_a_scored_reasoning_gym_task_reports_answer_accuracy(tokenizer_dir, tmp_path):
    assert cli.main(_sft_args(tokenizer_dir, "reasoning-gym:chain_sum?size=40&seed=1", tmp_path, "gym", max_steps=2,
                              eval_interval=0, checkpoint_interval=0, seq_len=128)) == 0
    report = json.loads((tmp_path / "gym" / "report.json").read_text())
    answers = report["answers"]["2"]
    from lmforge.data.chat_corpora import score_answer
    from lmforge.data.conversations import read_conversations

    # The accuracy is the task scorer's mean over the logged answers to the held-out prompts.
    assert "val_answer_accuracy" in report["after"] and len(answers) == 4
    conversations = read_conversations("reasoning-gym:chain_sum?size=40&seed=1")
    assert score_answer(conversations[0].meta, conversations[0].messages[-1]["content"]) == 1.0


@pytest.mark.parametrize("bad, message", [
    (["data=missing.jsonl"], "missing.jsonl"),
    (["model=bert-nano"], "causal LM"),
    (["seq_len=100000"], "seq_len"),
    (["max_step=1"], "did you mean 'max_steps'"),
    (["train_on=everything"], "train_on"),
    (["val_examples=1000"], "val_examples"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tokenizer_dir, tmp_path, capsys, bad, message):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    args = _sft_args(tokenizer_dir, data, tmp_path, "bad")
    args = [arg for arg in args if arg.split("=")[0] not in {b.split("=")[0] for b in bad}] + bad
    if bad[0].startswith("data="):
        args = [arg if not arg.startswith("data=") else f"data={tmp_path / 'missing.jsonl'}" for arg in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge sft: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_a_malformed_line_names_the_file_and_line(tokenizer_dir, tmp_path, capsys):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    lines = data.read_text().splitlines()
    lines[4] = '{"instruction": "no answer here"}'
    data.write_text("\n".join(lines) + "\n")
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "bad")) == 2
    err = capsys.readouterr().err
    assert "chats.jsonl:5" in err and "output" in err
    assert not (tmp_path / "bad").exists()


def test_lora_sft_keeps_adapters_in_checkpoints_exports_merged_and_resumes_exactly(tokenizer_dir, tmp_path):
    from lmforge.model.loading import load

    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    lora = ["peft=lora", "lora.r=4", "lora.alpha=8", "lora.target_modules=all-linear", "lr=1e-2"]
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "straight") + lora) == 0
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "resumed", max_steps=3) + lora) == 0
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "resumed") + lora + ["--resume"]) == 0

    checkpoint = tmp_path / "straight" / "checkpoints" / "step-000006"
    stored = load_file(checkpoint / "model.safetensors")
    assert stored and all(".lora." in name for name in stored)          # the frozen base is not copied
    exported = load_file(tmp_path / "straight" / "model.safetensors")
    assert not any(".lora." in name for name in exported)               # the run's model is merged and plain
    for name, tensor in exported.items():                               # resume: the same weights, bit for bit
        assert torch.equal(tensor, load_file(tmp_path / "resumed" / "model.safetensors")[name]), name

    # A checkpoint loads as its base (named in its config.json) plus its adapters, and gives the
    # logits of the merged export.
    final, tokenizer = load(checkpoint)
    from lmforge.model.builders import build_model
    from lmforge.model.loading import resolve_config

    merged = build_model(resolve_config(checkpoint)).eval()
    assert not merged.load_state_dict(exported, strict=False).unexpected_keys
    ids = torch.tensor([tokenizer.encode("What is 2 plus 3?")])
    torch.testing.assert_close(final(ids), merged(ids), atol=1e-5, rtol=1e-5)
    torch.manual_seed(1337)                                             # the seed sft built the base with
    base, _ = load("nano", tokenizer=tokenizer_dir)
    assert not torch.allclose(final(ids), base(ids), atol=1e-3)        # the adapters did learn something


def test_a_long_held_out_chat_is_asked_its_latest_turn_that_fits(tokenizer_dir, tmp_path):
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.sft import load_sft_config
    from lmforge.train.sft_data import prepare_sft_data

    long_turns = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "Yes."}]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": long_turns}) + "\n" for _ in range(6)))
    config = load_sft_config(None, [f"data={data}", "val_examples=5", "seq_len=64", "answer_tokens=8",
                                    "eval_prompts=6"])
    prepared = prepare_sft_data(config, load_tokenizer(tokenizer_dir))
    references = sorted(prompt.reference for prompt in prepared.prompts)
    # Every held-out chat gave a prompt: its first turn, as the last one does not fit in seq_len.
    assert len(prepared.prompts) == 5 and references == ["Hello."] * 5
    assert all(len(prompt.prompt_ids) + 8 <= 64 for prompt in prepared.prompts)
