"""`lmforge runs list` / `runs plot` and the plot_runs API, on runs written by the real Tracker."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from lmforge import cli
from lmforge.errors import UserError
from lmforge.track.runs import list_runs, plot_runs, resolve_run
from lmforge.track.tracker import Tracker

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, steps: int = 20, scale: float = 1.0, objective: str = "clm",
             finished: bool = False, config_in_checkpoint: bool = False) -> Path:
    """A run as the trainer leaves it: a config, train rows every step, eval rows every 5.

    The config is `run/config.yaml` naming the objective, or (config_in_checkpoint) only the
    pretraining config saved with the last checkpoint, where the model's arch implies the objective.
    """
    run = root / name
    run.mkdir(parents=True)
    model = {"arch": "bert" if objective == "mlm" else "gpt", "n_layers": 2, "d_model": 64}
    if config_in_checkpoint:
        checkpoint = run / "checkpoints" / f"step-{steps:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.yaml").write_text(yaml.safe_dump({"name": name, "preset": "tiny", "model": model}))
    else:
        (run / "config.yaml").write_text(yaml.safe_dump({"objective": objective, "model": model}))
    with Tracker(run, {}) as tracker:
        for step in range(1, steps + 1):
            loss = scale * (4 * math.exp(-step / 8) + 1)
            tracker.log(step, {"loss": loss, "lr": 1e-3 * min(1.0, step / 5), "tokens_per_s": 1000.0 + step,
                               "tokens_seen": 256 * step, "grad_norm": 0.5})
            if step % 5 == 0:
                evals = {"val_loss": loss + 0.1, "val_ppl": math.exp(loss + 0.1), "val_bpb": (loss + 0.1) / 3}
                if objective == "mlm":
                    evals["val_mlm_accuracy"] = 0.1 * step / steps
                tracker.log(step, evals)
    if finished:
        (run / "report.md").write_text("# done\n")
    return run


def test_runs_list_shows_each_run(tmp_path, capsys):
    make_run(tmp_path, "tiny-gpt", finished=True)
    make_run(tmp_path, "group/tiny-bert", objective="mlm", scale=1.5, config_in_checkpoint=True)
    assert cli.main(["runs", "list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    gpt_line = next(line for line in out.splitlines() if "tiny-gpt" in line)
    bert_line = next(line for line in out.splitlines() if "group/tiny-bert" in line)
    assert "clm" in gpt_line and "gpt 2L d64" in gpt_line and "finished" in gpt_line
    assert "mlm" in bert_line and "bert 2L d64" in bert_line and "updated" in bert_line
    summary = {run.name: run for run in list_runs(tmp_path)}["tiny-gpt"]
    expected_last = 4 * math.exp(-20 / 8) + 1
    assert summary.last_step == 20 and summary.tokens_seen == 5120
    assert summary.last_loss == pytest.approx(expected_last)
    assert summary.best_val_loss == pytest.approx(expected_last + 0.1)
    assert summary.val_bpb == pytest.approx((expected_last + 0.1) / 3)
    assert f"{expected_last:.3f}" in gpt_line


def test_runs_list_empty_and_missing_root(tmp_path, capsys):
    assert cli.main(["runs", "list", "--root", str(tmp_path)]) == 0
    assert "no runs under" in capsys.readouterr().out
    assert cli.main(["runs", "list", "--root", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_plot_runs_overlays_every_run(tmp_path):
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "b", scale=0.8), make_run(tmp_path, "c", objective="mlm")]
    out = tmp_path / "figs" / "compare.png"
    figure = plot_runs(runs, out)
    assert out.read_bytes()[:8] == PNG_HEADER
    assert [p.name for p in out.parent.iterdir()] == ["compare.png"]  # no temp file left behind
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert list(panels)[:3] == ["loss", "learning rate", "throughput (tokens/s)"]
    assert "val MLM accuracy" in panels and "MFU" not in panels  # only metrics that were logged
    loss_labels = [line.get_label() for line in panels["loss"].get_lines()]
    assert loss_labels == ["a (train)", "a (val)", "b (train)", "b (val)", "c (train)", "c (val)"]
    val_line = panels["loss"].get_lines()[1]
    assert list(val_line.get_xdata()) == [5, 10, 15, 20] and val_line.get_marker() == "o"
    assert len(panels["learning rate"].get_lines()) == 3
    assert len(panels["val MLM accuracy"].get_lines()) == 1  # only the masked-LM run has it


def test_plot_against_tokens_puts_eval_rows_at_their_steps_tokens(tmp_path):
    figure = plot_runs([make_run(tmp_path, "a")], None, x="tokens")
    val_line = figure.axes[0].get_lines()[1]
    assert list(val_line.get_xdata()) == [1280, 2560, 3840, 5120]


def test_runs_plot_command_resolves_names_and_paths(tmp_path, capsys):
    make_run(tmp_path, "a")
    second = make_run(tmp_path, "b")
    out = tmp_path / "fig.png"
    assert cli.main(["runs", "plot", "a", str(second), "--root", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_HEADER and "2 runs" in capsys.readouterr().out


def test_plot_errors_are_user_errors(tmp_path, capsys):
    make_run(tmp_path, "a")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    out = str(tmp_path / "fig.png")
    assert cli.main(["runs", "plot", "nope", "--root", str(tmp_path), "--out", out]) == 2
    assert "run 'nope' is neither a run directory nor a run name; runs under" in capsys.readouterr().err
    assert cli.main(["runs", "plot", "not-a-run", "--root", str(tmp_path), "--out", out]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(UserError, match="empty metrics.jsonl"):
        plot_runs([resolve_run("empty", tmp_path)], out)
    with pytest.raises(UserError, match="use one of these suffixes"):
        plot_runs([tmp_path / "a"], tmp_path / "fig.xyz")
    assert not (tmp_path / "fig.png").exists()


def test_plot_to_an_unwritable_place_is_a_user_error(tmp_path, capsys):
    make_run(tmp_path, "a")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli.main(["runs", "plot", "a", "--root", str(tmp_path), "--out", str(blocker / "fig.png")]) == 2
    assert "cannot write to output directory" in capsys.readouterr().err
    # A folder that does not exist yet is made, as `pretrain out_dir=` does.
    assert cli.main(["runs", "plot", "a", "--root", str(tmp_path), "--out", str(tmp_path / "new" / "fig.png")]) == 0
    assert (tmp_path / "new" / "fig.png").read_bytes()[:8] == PNG_HEADER


def test_runs_list_skips_metric_values_that_are_not_finite_numbers(tmp_path, capsys):
    run = make_run(tmp_path, "damaged", steps=5)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as log:
        # JSON reads 1e999 as infinity; the others are a string, a bool, a list and a 400-digit integer.
        log.write('{"step": 1e999, "loss": 1.0}\n{"step": 6, "loss": "y"}\n{"step": 7, "loss": true}\n'
                  '{"step": [8], "tokens_seen": 1e999}\n{"step": 9, "tokens_seen": ' + "9" * 400 + "}\n")
    assert cli.main(["runs", "list", "--root", str(tmp_path)]) == 0
    summary = list_runs(tmp_path)[0]
    assert summary.last_step == 9 and summary.tokens_seen == 5 * 256
    assert summary.last_loss == pytest.approx(4 * math.exp(-5 / 8) + 1)   # the last real loss
    assert "damaged" in capsys.readouterr().out
    assert cli.main(["runs", "plot", str(run), "--out", str(tmp_path / "p.png"), "--x", "tokens"]) == 0


def test_run_names_and_models_are_shown_as_text_not_rich_markup(tmp_path, capsys):
    run = make_run(tmp_path / "[", "x]")          # the run name is "[/x]", a closing tag to rich
    (run / "config.yaml").write_text("model: {preset: '[bold]tiny[/bold]'}\n")
    assert cli.main(["runs", "list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[/x]" in out and "[bold]tiny[/bold]" in out


def test_a_diverged_run_still_shows_its_nan_loss(tmp_path):
    run = make_run(tmp_path, "diverged", steps=5)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as log:
        log.write('{"step": 6, "loss": NaN}\n')
    assert math.isnan(list_runs(tmp_path)[0].last_loss)


def test_metrics_lines_too_large_or_deep_for_json_are_skipped(tmp_path):
    from lmforge.track.tracker import read_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": ' + "9" * 5000 + '}\n' + "[" * 100000 + "\n"
                   '{"step": 2, "loss": 1.5}\n')
    assert read_jsonl(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
