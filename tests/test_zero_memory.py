"""ZeRO made visible: on 2 gloo ranks, the measured per-rank parameter + gradient + optimizer-state bytes
shrink in the order ZeRO predicts (DDP > ZeRO-2-like > ZeRO-3-like FSDP2), the predictions follow the
paper's formulas, and the DeepSpeed config carries our training settings."""
from __future__ import annotations

import json

import pytest

from lmforge import cli
from lmforge.errors import UserError
from lmforge.train.zero import ZeroConfig, deepspeed_config, format_table, measure, predicted_bytes


def test_the_prediction_is_the_papers_table():
    psi, n = 1000, 4
    assert predicted_bytes(psi, n, "ddp", paper=True)["total"] == 16 * psi            # (2 + 2 + 12) Psi
    assert predicted_bytes(psi, n, "zero2", paper=True)["total"] == 2 * psi + 14 * psi / n
    assert predicted_bytes(psi, n, "zero3", paper=True)["total"] == 16 * psi / n
    fp32 = predicted_bytes(psi, n, "zero2")
    assert (fp32["params"], fp32["grads"], fp32["optimizer"]) == (4 * psi, 4 * psi / n, 8 * psi / n)
    assert predicted_bytes(psi, n, "zero3-offload") == predicted_bytes(psi, n, "zero3")


def test_two_ranks_shrink_model_state_in_zero_order():
    results = measure(ZeroConfig(model="nano", strategies=["ddp", "zero2", "zero3"], steps=2, seq_len=16))
    by_name = {ranks[0]["strategy"]: ranks for ranks in results}
    psi = by_name["ddp"][0]["n_params"]
    for rank in range(2):
        ddp, zero2, zero3 = (by_name[name][rank]["measured"] for name in ("ddp", "zero2", "zero3"))
        # DDP: every rank holds everything: weights, gradients and Adam's two moments, in fp32.
        assert ddp["params"] == 4 * psi and ddp["grads"] == 4 * psi
        assert 8 * psi <= ddp["optimizer"] <= 8 * psi + 1024                  # + Adam's step counters
        # ZeRO-2-like: the gathered weights stay whole between forward and backward; Adam's state is halved
        # (up to the padding of each shard to a multiple of the world size).
        assert zero2["params"] == 4 * psi
        assert zero2["optimizer"] < 0.6 * ddp["optimizer"]
        # ZeRO-3-like: the weights are sharded too (only the block being computed, and the root's
        # embeddings while the model runs, are gathered).
        assert zero3["params"] < zero2["params"]
        assert zero3["optimizer"] == zero2["optimizer"]
        assert ddp["total"] > zero2["total"] >= zero3["total"]
        # The same model and data under every strategy: the same losses.
        losses = {by_name[name][rank]["loss"] for name in ("ddp", "zero2", "zero3")}
        assert max(losses) - min(losses) < 1e-4
    table = format_table(results, 2)
    assert table.count("\n") == 4 and "| zero3 | 3 |" in table


def test_deepspeed_config_carries_our_settings():
    from lmforge.train.sft import load_sft_config

    config = load_sft_config("sft-smollm2-countdown", ["grad_accum=2", "precision=bf16"])
    ds = deepspeed_config(config, 3, world_size=4, offload=True)
    assert ds["train_micro_batch_size_per_gpu"] == config.batch_size and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == config.batch_size * 2 * 4
    assert ds["optimizer"]["params"]["lr"] == config.lr and ds["gradient_clipping"] == config.grad_clip
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert deepspeed_config(config, 2)["zero_optimization"]["stage"] == 2
    with pytest.raises(UserError):
        deepspeed_config(config, 1)


def test_zero_command_writes_a_ds_config_and_refuses_bad_input(tmp_path, capsys):
    path = tmp_path / "ds_config.json"
    assert cli.main(["zero", "--ds-config", str(path), "--stage", "2", "--config", "sft-smollm2-countdown"]) == 0
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == 2
    assert cli.main(["zero", "--strategies", "ddp,zero9"]) == 2
    assert "zero9" in capsys.readouterr().err
    assert cli.main(["zero", "--model", "no-such-preset"]) == 2
