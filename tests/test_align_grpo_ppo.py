"""GRPO, RLOO and PPO through the one Trainer on a tiny GPT: each raises its reward; resume is exact
in the middle of a generation (the rollout buffer and the KL coefficient are objective state);
the engine prefills a group's shared prompt once; rewards from reasoning-gym's scorer and from a
reward-model run; bad input gets one clear error and leaves nothing behind."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge import cli

from rl_support import write_prompts
from train_support import make_shakespeare_shards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "rl-shakespeare")[1]


def _arguments(command: str, tokenizer_dir: str, prompts, out_dir, name: str, **extra) -> list[str]:
    settings = dict(model="nano", tokenizer=tokenizer_dir, prompts=prompts, out_dir=out_dir, name=name,
                    rewards="[rl_support:letter_e]", num_generations=4, batch_size=8, max_new_tokens=12, max_steps=12,
                    lr=1e-2, schedule="constant", eval_interval=6, checkpoint_interval=6, val_prompts=8,
                    eval_samples=1, progress=False, precision="fp32")   # auto picks bf16 where the CPU has it
    if command == "ppo":
        settings.update(num_generations=1, beta=0.001, lam=1.0, num_iterations=1, steps_per_generation=1, max_steps=20,
                        eval_interval=10, checkpoint_interval=10)
    settings.update(extra)
    return ["align", command, *(f"{key}={value}" for key, value in settings.items())]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _reward_rises(run, window: int = 4) -> tuple[float, float]:
    rewards = [row["reward"] for row in _rows(run) if "reward" in row]
    return sum(rewards[:window]) / window, sum(rewards[-window:]) / window


def test_the_engine_prefills_a_shared_prompt_once_with_the_same_samples(tokenizer_dir):
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model import build_model, get_preset
    from lmforge.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = build_model(get_preset("nano")).eval(), load_tokenizer(tokenizer_dir)
    prompt = tokenizer.encode("ROMEO: what light")
    params = [SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed) for seed in range(4)]
    alone = [Engine(model, tokenizer, max_batch_size=1).generate([prompt], p)[0].token_ids for p in params]
    engine = Engine(model, tokenizer, max_batch_size=4)
    sequences = [engine.submit(prompt, p) for p in params]
    while not all(s.finished for s in sequences):
        engine.step()
    assert [s.token_ids for s in sequences] == alone
    assert engine.stats.shared_prefill_tokens == 3 * len(prompt)
    assert engine.stats.prompt_tokens == len(prompt)


@pytest.mark.parametrize("method, extra", [("grpo", dict(loss_type="bnpo", max_steps=18)), ("rloo", dict(method="rloo")),
                                           ("ppo", dict())])
def test_each_method_raises_its_reward_end_to_end(tokenizer_dir, tmp_path, method, extra):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    command = "ppo" if method == "ppo" else "grpo"
    assert cli.main(_arguments(command, tokenizer_dir, prompts, tmp_path, method, **extra)) == 0
    run = tmp_path / method
    for name in ("config.yaml", "metrics.jsonl", "report.md", "report.json", "curves.png", "model.safetensors"):
        assert (run / name).is_file(), name
    first, last = _reward_rises(run)
    assert last > 1.5 * first, (first, last)
    rows = _rows(run)
    logged = set().union(*rows)
    assert {"reward", "entropy", "clip_ratio", "completion_length", "generate_s", "val_reward"} <= logged
    if method == "ppo":
        assert {"value_loss", "kl", "kl_coef", "approx_kl", "value_clip_ratio"} <= logged
    else:
        assert "frac_reward_zero_std" in logged
    report = (run / "report.md").read_text()
    assert "held-out metric" in report and "Held-out answers" in report


def test_grpo_resumes_exactly_in_the_middle_of_a_generation(tokenizer_dir, tmp_path):
    # 2 iterations x 2 steps per generation: step 3 is the second update of generation 1's second pass.
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    extra = dict(num_iterations=2, steps_per_generation=2, beta=0.05, loss_type="grpo", max_steps=6,
                 checkpoint_interval=3, eval_interval=0, batch_size=4)
    assert cli.main(_arguments("grpo", tokenizer_dir, prompts, tmp_path, "straight", **extra)) == 0
    assert cli.main(_arguments("grpo", tokenizer_dir, prompts, tmp_path, "resumed", **{**extra, "max_steps": 3})) == 0
    assert cli.main(_arguments("grpo", tokenizer_dir, prompts, tmp_path, "resumed", **extra) + ["--resume"]) == 0
    straight, resumed = (load_file(tmp_path / r / "model.safetensors") for r in ("straight", "resumed"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    losses = {r: [row["loss"] for row in _rows(tmp_path / r) if "loss" in row] for r in ("straight", "resumed")}
    assert losses["straight"] == losses["resumed"] and len(losses["straight"]) == 6
    assert any(row.get("clip_ratio", 0) > 0 for row in _rows(tmp_path / "straight"))   # off-policy updates clip


def test_ppo_resume_keeps_the_adaptive_kl_coefficient(tokenizer_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    extra = dict(adaptive_kl=True, kl_target=0.01, kl_horizon=8, beta=0.1, max_steps=4, checkpoint_interval=2,
                 eval_interval=0, num_iterations=2, batch_size=4)
    assert cli.main(_arguments("ppo", tokenizer_dir, prompts, tmp_path, "straight", **extra)) == 0
    assert cli.main(_arguments("ppo", tokenizer_dir, prompts, tmp_path, "resumed", **{**extra, "max_steps": 2})) == 0
    assert cli.main(_arguments("ppo", tokenizer_dir, prompts, tmp_path, "resumed", **extra) + ["--resume"]) == 0
    coefficients = {r: [row["kl_coef"] for row in _rows(tmp_path / r) if "kl_coef" in row] for r in ("straight", "resumed")}
    assert coefficients["straight"] == coefficients["resumed"]
    assert coefficients["straight"][-1] != 0.1            # it moved (KL above a tiny target: it grew)
    straight, resumed = (load_file(tmp_path / r / "model.safetensors") for r in ("straight", "resumed"))
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def test_grpo_on_reasoning_gym_reports_accuracy_and_pass_at_k(tokenizer_dir, tmp_path):
    arguments = _arguments("grpo", tokenizer_dir, "reasoning-gym:chain_sum?size=24&seed=0", tmp_path, "gym",
                           rewards="[task,format]", reward_weights="[1.0,0.1]", max_steps=2, eval_interval=2,
                           max_new_tokens=6, max_prompt_tokens=120, eval_samples=2, val_prompts=4)
    assert cli.main(arguments) == 0
    rows = _rows(tmp_path / "gym")
    logged = set().union(*rows)
    assert {"accuracy", "val_accuracy", "val_pass@2", "val_sample_accuracy"} <= logged


def test_ppo_scores_with_a_reward_model_run(tokenizer_dir, tmp_path):
    from align_support import write_arithmetic_pairs

    pairs = write_arithmetic_pairs(tmp_path / "pairs.jsonl", n=24)
    assert cli.main(["align", "reward", "model=nano", f"tokenizer={tokenizer_dir}", f"pairs={pairs}",
                     f"out_dir={tmp_path}", "name=rm", "max_steps=2", "batch_size=4", "val_pairs=8", "seq_len=64",
                     "export_hf=false", "progress=false", "eval_interval=0", "checkpoint_interval=0"]) == 0
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    assert cli.main(_arguments("ppo", tokenizer_dir, prompts, tmp_path, "ppo-rm", reward_model=tmp_path / "rm",
                               max_steps=2, eval_interval=2, batch_size=4, missing_eos_penalty=1.0)) == 0
    rows = _rows(tmp_path / "ppo-rm")
    assert any("val_rm_score" in row for row in rows) and any("reward" in row for row in rows)


@pytest.mark.parametrize("extra, message", [
    (dict(rewards="[rl_support:raises]"), "reward function 'rl_support:raises' raised RuntimeError: the scorer broke"),
    (dict(rewards="[rl_support:not_numbers]"), "returned 'high', which is not a finite number"),
    (dict(rewards="[no_such_module:f]"), "importing 'no_such_module' failed"),
    (dict(rewards="[gsm8k]", prompts="PROMPTS_WITHOUT_ANSWERS"), "reward 'gsm8k' needs a reference answer"),
    (dict(prompts="BAD_LINE"), "prompts.jsonl:2: missing field prompt"),
    (dict(batch_size=6), "must be a multiple of num_generations=4"),
])
def test_bad_input_is_one_clear_error_and_leaves_no_run(tokenizer_dir, tmp_path, capsys, extra, message):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    if extra.get("prompts") == "BAD_LINE":
        prompts.write_text('{"prompt": "hi"}\n{"question": "no prompt"}\n', encoding="utf-8")
        extra = {}
    elif extra.get("prompts") == "PROMPTS_WITHOUT_ANSWERS":
        prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(20)), encoding="utf-8")
        extra = {k: v for k, v in extra.items() if k != "prompts"}
    assert cli.main(_arguments("grpo", tokenizer_dir, prompts, tmp_path, "bad", **extra)) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "bad").exists()


def test_ppo_refuses_a_directory_that_is_not_a_reward_model(tokenizer_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    assert cli.main(_arguments("ppo", tokenizer_dir, prompts, tmp_path, "bad", reward_model=tmp_path)) == 2
    assert "is not a reward-model run" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_reference_with_another_vocabulary_is_refused_before_anything_is_written(tokenizer_dir, tmp_path, capsys):
    from lmforge.model import build_model, get_preset
    from lmforge.model.loading import save_pretrained

    other = tmp_path / "other"
    save_pretrained(build_model(get_preset("nano", vocab_size=77)), None, other)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    assert cli.main(_arguments("grpo", tokenizer_dir, prompts, tmp_path, "bad", beta=0.1, reference=other)) == 2
    assert "another vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_system_prompt_goes_first_unless_a_prompt_has_its_own():
    from lmforge.align.rewards import Prompt
    from lmforge.align.rl_run import with_system

    plain = Prompt([{"role": "user", "content": "2 + 2 ="}], "4")
    own = Prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "1 + 1 ="}], "2")
    first, second = with_system([plain, own], "Reply with only the number.")
    assert first.messages == [{"role": "system", "content": "Reply with only the number."}, *plain.messages]
    assert first.answer == "4" and second is own
    assert with_system([plain], None) == [plain]
