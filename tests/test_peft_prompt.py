"""Prompt tuning, P-tuning and prefix tuning (lmforge.peft.prompt) against peft on our HF export,
with the KV cache in generation, through the Trainer and `lmforge sft`, and their bad inputs."""
from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge import cli
from lmforge.errors import UserError
from lmforge.model import build_model, get_preset
from lmforge.model.loading import export, load, save_pretrained
from lmforge.peft.prompt import (PromptConfig, PromptTunedLM, apply_prompt_tuning, load_prompt_adapter,
                                 save_prompt_adapter)

from train_support import CountingBatches, make_shakespeare_shards, parameters_of, write_arithmetic_chats

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
METHODS = [
    pytest.param("prompt", {}, id="prompt-tuning"),
    pytest.param("ptuning", {}, id="p-tuning-mlp"),
    pytest.param("ptuning", {"encoder": "lstm"}, id="p-tuning-lstm"),
    pytest.param("prefix", {}, id="prefix"),
    pytest.param("prefix", {"prefix_projection": True}, id="prefix-mlp"),
]


def _model(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(get_preset("nano", **{"vocab_size": VOCAB, **overrides})).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def _adapted(method: str, extra: dict, base: nn.Module | None = None, n: int = 5) -> PromptTunedLM:
    model = apply_prompt_tuning(base if base is not None else _model(),
                                PromptConfig(method=method, num_virtual_tokens=n, init="random", **extra)).eval()
    with torch.no_grad():                       # move off the initial values so every check can fail
        generator = torch.Generator().manual_seed(7)
        for param in model.prompt_encoder.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-hf")
    made = {}

    def get(**overrides) -> str:
        key = tuple(sorted(overrides.items()))
        if key not in made:
            made[key] = str(export(_model(**overrides), None, root / f"hf-{len(made)}", "hf"))
        return made[key]

    return get


@pytest.mark.parametrize("overrides", [{}, {"rope_interleaved": True}], ids=["llama", "interleaved-rope"])
@pytest.mark.parametrize("method, extra", METHODS)
def test_our_prompt_adapter_loads_into_peft_with_our_logits(exports, tmp_path, method, extra, overrides):
    model = _adapted(method, extra, _model(**overrides))
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
        assert (ours - model.base(ids)).abs().max() > 1e-2          # the prompt does something
    save_prompt_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}[method]
    assert list(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == ["prompt_embeddings"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(exports(**overrides)).eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = theirs(input_ids=ids).logits[:, -ids.shape[1]:]     # peft also returns the virtual positions
        torch.testing.assert_close(logits, ours, atol=1e-4, rtol=0)
        reloaded = load_prompt_adapter(_model(**overrides), tmp_path / "adapter")
        torch.testing.assert_close(reloaded(ids), ours, atol=1e-5, rtol=0)


def test_prompt_tuning_init_from_text_matches_peft():
    """init=text repeats the text's tokens to n and copies their embeddings (peft's TEXT init)."""
    model = _model()

    class Ids:                                     # a tokenizer stand-in: fixed ids for the text
        @staticmethod
        def encode(text):
            return [3, 9, 27]

    adapted = apply_prompt_tuning(model, PromptConfig(num_virtual_tokens=7, init="text", init_text="x"), Ids())
    table = model.transformer.embed_tokens.weight
    torch.testing.assert_close(adapted.prompt_encoder.embedding.weight, table[[3, 9, 27, 3, 9, 27, 3]])


@pytest.mark.parametrize("method, extra", METHODS)
def test_generation_with_the_kv_cache_equals_recomputing_without_it(method, extra):
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    from infer_support import load_tiny

    base, tokenizer = load_tiny()
    model = _adapted(method, extra, base, n=4)
    prompts = ["ROMEO: What", "JULIET: O Romeo, Romeo", "Good"]
    engine = Engine(model, tokenizer, max_batch_size=2)       # 3 prompts on 2 rows: a row is reused
    results = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            for _ in range(8):                                # no cache: the whole sequence each step
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert result.token_ids == ids[len(tokenizer.encode(prompt)):], prompt
    # The virtual tokens reach the model: its next-token logits differ from the bare base's. (Not the
    # generated text: the tiny model's greedy text can be the same with and without the prompt.)
    ids = torch.tensor([tokenizer.encode(prompts[0])])
    with torch.no_grad():
        assert (model(ids)[0, -1] - base(ids)[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("method, extra", [METHODS[0], METHODS[2], METHODS[4]])
def test_only_the_prompt_changes_through_the_trainer_and_padding_is_handled(tmp_path, method, extra):
    from lmforge.train import CausalLMObjective, Trainer, TrainConfig
    from lmforge.train.objectives import SFTObjective

    model = _adapted(method, extra)
    model.train()
    before = parameters_of(model)
    config = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=0, log_interval=1, eval_interval=0,
                         checkpoint_interval=0, progress=False)
    objective = SFTObjective() if method == "prompt" else CausalLMObjective()
    trainer = Trainer(model, objective, CountingBatches(4, 12, padded=True), config, run_dir=tmp_path)
    trainer.fit()
    after = parameters_of(model)
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]) != name.startswith("prompt_encoder."), name


def test_right_padding_does_not_change_a_rows_logits():
    model = _adapted("prefix", {})
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        alone = model(ids[1:, :7])
    torch.testing.assert_close(padded[1, :7], alone[0], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return make_shakespeare_shards(tmp_path_factory.getbasetemp() / "prompt-shakespeare")[1]


def _sft_args(tokenizer_dir, data, out_dir, name, method, **extra) -> list[str]:
    settings = dict(model="nano", tokenizer=tokenizer_dir, data=data, out_dir=out_dir, name=name, seq_len=64,
                    batch_size=4, max_steps=4, lr=1e-2, warmup_steps=0, schedule="constant", log_interval=1,
                    eval_interval=2, checkpoint_interval=2, val_examples=8, eval_prompts=2, answer_tokens=4,
                    progress=False, peak_flops=1e12, packing="false", peft=method)
    settings.update(extra)
    return ["sft", *(f"{k}={v}" for k, v in settings.items()), "prompt.num_virtual_tokens=3"]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_sft_with_a_prompt_resumes_exactly_and_its_adapter_generates(tokenizer_dir, tmp_path, method, capsys):
    data = write_arithmetic_chats(tmp_path / "chats.jsonl")
    tokenizer = load("nano", tokenizer=tokenizer_dir)[1]
    base_dir = tmp_path / "base"
    save_pretrained(_model(vocab_size=tokenizer.vocab_size), tokenizer, base_dir)
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "straight", method, model=base_dir)) == 0
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "resumed", method, model=base_dir, max_steps=2)) == 0
    assert cli.main(_sft_args(tokenizer_dir, data, tmp_path, "resumed", method, model=base_dir) + ["--resume"]) == 0
    stored = load_file(tmp_path / "straight" / "checkpoints" / "step-000004" / "model.safetensors")
    assert stored and all(name.startswith("prompt_encoder.") for name in stored)   # the base is not copied
    straight, resumed = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
                         for run in ("straight", "resumed"))
    assert torch.equal(straight, resumed)
    checkpoint, _ = load(tmp_path / "straight" / "checkpoints" / "step-000004")
    assert isinstance(checkpoint, PromptTunedLM)

    # `generate --model BASE --adapter run/adapter` gives the prompt-tuned model's greedy tokens.
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(base_dir), "--adapter", str(tmp_path / "straight" / "adapter"),
                     "--prompt", "What is", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    adapted = load_prompt_adapter(load(base_dir)[0], tmp_path / "straight" / "adapter")
    ids = tokenizer.encode("What is")
    with torch.no_grad():
        torch.testing.assert_close(adapted(torch.tensor([ids])), checkpoint(torch.tensor([ids])), atol=1e-5, rtol=0)
        for _ in range(5):
            ids.append(int(adapted(torch.tensor([ids]))[0, -1].argmax()))
    assert tokenizer.decode(ids[len(tokenizer.encode("What is")):]) in printed


def test_bad_prompt_configs_and_adapters_are_user_errors(tmp_path, tokenizer_dir, capsys):
    with pytest.raises(UserError, match="packing=false"):
        cli_args = _sft_args(tokenizer_dir, tmp_path / "x.jsonl", tmp_path, "bad", "prompt", packing="true")
        from lmforge.train.sft import load_sft_config

        load_sft_config(None, cli_args[1:]).validate()
    with pytest.raises(UserError, match="init_text"):
        PromptConfig(init="text").validate()
    with pytest.raises(UserError, match="num_virtual_tokens"):
        PromptConfig(num_virtual_tokens=0).validate()

    model = _adapted("prefix", {})
    directory = save_prompt_adapter(model, tmp_path / "adapter")
    with pytest.raises(UserError, match="trained on another base model"):
        load_prompt_adapter(_model(n_layers=3), directory)
    with pytest.raises(UserError, match="not a PEFT adapter directory"):
        load_prompt_adapter(_model(), tmp_path / "nowhere")
    weights = directory / "adapter_model.safetensors"
    save_file({"something_else": torch.zeros(2)}, str(weights))
    with pytest.raises(UserError, match="no 'prompt_embeddings'"):
        load_prompt_adapter(_model(), directory)
    weights.unlink()
    with pytest.raises(UserError, match="incomplete"):
        load_prompt_adapter(_model(), directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": "five"}))
    with pytest.raises(UserError, match="num_virtual_tokens"):
        load_prompt_adapter(_model(), directory)
    with pytest.raises(UserError, match="no prompt adapter to save"):
        save_prompt_adapter(_model(), tmp_path / "none")

    # From the command line: one sentence, exit 2.
    base_dir = tmp_path / "base"
    tokenizer = load("nano", tokenizer=tokenizer_dir)[1]
    save_pretrained(_model(vocab_size=tokenizer.vocab_size), tokenizer, base_dir)
    other = save_prompt_adapter(_adapted("prompt", {}, _model(d_model=96, vocab_size=tokenizer.vocab_size)),
                                tmp_path / "other")
    assert cli.main(["generate", "--model", str(base_dir), "--adapter", str(other), "--prompt", "x"]) == 2
    assert "trained on another base model" in capsys.readouterr().err
    fitting = save_prompt_adapter(_adapted("prompt", {}, _model(vocab_size=tokenizer.vocab_size)), tmp_path / "fits")
    assert cli.main(["convert", str(base_dir), "--to", str(tmp_path / "merged"), "--merge-adapter", str(fitting)]) == 2


def test_web_takes_an_adapter_for_a_local_model(tmp_path, tokenizer_dir):
    from lmforge.cli import build_command_parser
    from lmforge.infer.commands import load_engine

    tokenizer = load("nano", tokenizer=tokenizer_dir)[1]
    base_dir = tmp_path / "base"
    save_pretrained(_model(vocab_size=tokenizer.vocab_size), tokenizer, base_dir)
    adapter = save_prompt_adapter(_adapted("prefix", {}, _model(vocab_size=tokenizer.vocab_size)), tmp_path / "ad")
    args = build_command_parser("web").parse_args(["--model", str(base_dir), "--adapter", str(adapter)])
    engine = load_engine(args, max_batch_size=args.max_batch_size)
    assert isinstance(engine.model, PromptTunedLM)
    assert cli.main(["web", "--server-url", "http://127.0.0.1:9", "--adapter", str(adapter)]) == 2
