"""`lmforge quantize` (the lab) on the tiny trained model: the report, the PNG, and bad input."""
from __future__ import annotations

import pytest
import torch

from infer_support import load_tiny, tiny_model_dir
from lmforge.cli import main
from lmforge.quant.lab import outlier_census

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lab_writes_report_and_png(tmp_path, capsys):
    out = tmp_path / "lab"
    code = main(["quantize", "--model", str(tiny_model_dir()), "--out", str(out), "--census-tokens", "64",
                 "--ppl-tokens", "129", "--methods", "fp32,llm-int8,llm-int8-nodecomp,int8,q4_0,q4_0-cal",
                 "--calibrate", "256", "--calibration-text", "wiki+chat"])
    assert code == 0
    report = (out / "report.md").read_text()
    assert "| transformer.blocks.0.attn.qkv | 64 |" in report
    assert "on 256 tokens of 'wiki+chat'" in report
    for label in ("fp32", "llm-int8", "llm-int8-nodecomp", "int8", "q4_0", "q4_0-cal"):
        assert f"| {label} | " in report
    assert "| fp32 | " in report and "| 1.0000 |" in report
    assert (out / "outliers.png").read_bytes()[:4] == b"\x89PNG"


def test_census_finds_a_planted_outlier_feature():
    model, tokenizer = load_tiny()
    ids = tokenizer.encode("ROMEO: But soft, what light through yonder window breaks?")
    threshold = 50.0                                     # above anything the trained tiny model has
    assert outlier_census(model, ids, threshold).systematic == []
    with torch.no_grad():                                # dimension 5 of the normed input to every block
        # Every token's residual gets a large dim 5 (how real outlier features look), so that the
        # normed value is large for all tokens whatever the trained weights (they differ by CPU).
        model.transformer.embed_tokens.weight[:, 5] += 30.0
        for block in model.transformer.blocks:
            block.attn_norm.weight[5] = 1e4
            block.mlp_norm.weight[5] = 1e4
    census = outlier_census(model, ids, threshold)
    assert [dim for dim, _, _ in census.systematic] == [5]
    qkv = next(layer for layer in census.layers if layer.name.endswith("0.attn.qkv"))
    assert 5 in qkv.columns and qkv.tokens_with_outlier == len(ids)
    assert census.column_max.shape == (2 * len(model.transformer.blocks), model.config.d_model)


@pytest.mark.parametrize("argv,message", [
    (["--methods", "fp32,int4"], "unknown --methods int4"),
    (["--threshold", "0"], "--threshold 0.0 must be above 0"),
])
def test_lab_bad_values_exit_2(tmp_path, capsys, argv, message):
    code = main(["quantize", "--model", str(tiny_model_dir()), "--out", str(tmp_path)] + argv)
    assert code == 2 and message in capsys.readouterr().err
