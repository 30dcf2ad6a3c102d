"""The leaderboard from synthetic results files and a synthetic arena log: the table, its
averages and order, merging, the HTML page, the PNG, serving, the CLI, and bad input."""
from __future__ import annotations

import base64
import io
import re
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.eval.battle_log import BattleLog, BattleRecord
from lmforge.eval.leaderboard import (build_board, find_results, format_table, load_all, render_html, render_png,
                                      serve_html)
from lmforge.eval.results import EvalResults, TaskResult
from lmforge.serve.server import free_port


def write_results(root):
    """SmolLM2 (all three tasks, plus an older gsm8k result) and a speedrun run (two tasks)."""
    smol = {"gsm8k-mini": TaskResult("exact_match", 0.04, 0.02, 100),
            "mmlu-fewshot": TaskResult("acc", 0.32, 0.03, 285),
            "shakespeare-bpb": TaskResult("bits_per_byte", 1.95, None, 1)}
    EvalResults("smollm2-135m-instruct", "smollm2-135m-instruct", 134_515_008, smol,
                date="2026-12-01T10:00:00+00:00").save(root / "artifacts/eval/smollm2.json")
    EvalResults("smollm2-135m-instruct", "smollm2-135m-instruct", 134_515_008,
                {"gsm8k-mini": TaskResult("exact_match", 0.50, 0.05, 100)},
                date="2026-11-01T10:00:00+00:00").save(root / "artifacts/eval/smollm2-old.json")
    EvalResults("runs/speedrun-gpt", "speedrun-gpt", 7_340_032,
                {"mmlu-fewshot": TaskResult("acc", 0.25, 0.03, 285),
                 "shakespeare-bpb": TaskResult("bits_per_byte", 1.52, None, 1)},
                date="2026-12-01T09:00:00+00:00").save(root / "runs/speedrun-gpt/eval/results.json")
    (root / "runs/speedrun-gpt/eval/notes.json").write_text('{"not": "results"}')   # ignored: not results


def write_arena(path, smol_wins=30, speedrun_wins=10):
    log = BattleLog(path)
    for n in range(smol_wins + speedrun_wins):
        winner = "a" if n < smol_wins else "b"
        log.record(BattleRecord("smollm2-135m-instruct", "speedrun-gpt", winner, "human", f"p{n}"))
    return log


def test_table_columns_average_and_order(tmp_path):
    write_results(tmp_path)
    board = build_board(load_all(find_results(root=tmp_path)))
    assert board.tasks == [("gsm8k-mini", "exact_match"), ("mmlu-fewshot", "acc"),
                           ("shakespeare-bpb", "bits_per_byte")]
    smol, speedrun = board.rows                        # the model with every task comes first
    assert smol.model == "smollm2-135m-instruct" and speedrun.model == "speedrun-gpt"
    assert smol.scores["gsm8k-mini"].value == 0.04     # the newer of two results wins
    assert smol.average == pytest.approx(100 * (0.04 + 0.32) / 2) and smol.complete   # bpb not averaged
    assert speedrun.average == pytest.approx(25.0) and not speedrun.complete
    text = format_table(board)
    lines = text.splitlines()
    assert lines[0].split() == ["#", "model", "average", "gsm8k-mini", "mmlu-fewshot", "shakespeare-bpb", "↓",
                                "arena", "(BT)", "params", "date"]
    assert lines[2].split() == ["1", "smollm2-135m-instruct", "18.0", "4.0", "32.0", "1.950", "-", "134.5M",
                                "2026-12-01"]
    assert lines[3].split() == ["2", "speedrun-gpt", "25.0*", "-", "25.0", "1.520", "-", "7.3M", "2026-12-01"]


def test_arena_ratings_join_by_name(tmp_path):
    from lmforge.eval.arena_command import ratings_table

    write_results(tmp_path)
    write_arena(tmp_path / "battles.sqlite")
    arena = ratings_table(str(tmp_path / "battles.sqlite"), rounds=50)
    arena.append({**arena[0], "model": "only-in-the-arena", "bt": 900.0, "lower": 850.0, "upper": 950.0})
    board = build_board(load_all(find_results(root=tmp_path)), arena)
    by_name = {row.model: row for row in board.rows}
    assert by_name["smollm2-135m-instruct"].arena["bt"] > 1000 > by_name["speedrun-gpt"].arena["bt"]
    assert by_name["only-in-the-arena"].scores == {} and board.rows[-1].model == "only-in-the-arena"
    line = next(l for l in format_table(board).splitlines() if l.startswith("1 "))
    assert re.search(r" \d{4} \(\d{3,4}-\d{4}\) ", line), line


def test_png_heatmap_and_arena_panel(tmp_path):
    write_results(tmp_path)
    results = load_all(find_results(root=tmp_path))
    out = tmp_path / "board.png"
    data = render_png(build_board(results), out)
    assert out.read_bytes() == data
    heatmap_only = Image.open(io.BytesIO(data))
    arena = [{"model": "speedrun-gpt", "bt": 950.0, "lower": 900.0, "upper": 1000.0, "rank": 2, "elo": 950.0,
              "battles": 10},
             {"model": "smollm2-135m-instruct", "bt": 1050.0, "lower": 1000.0, "upper": 1100.0, "rank": 1,
              "elo": 1050.0, "battles": 10}]
    both = Image.open(io.BytesIO(render_png(build_board(results, arena))))
    assert heatmap_only.format == both.format == "PNG"
    assert both.width > heatmap_only.width + 300       # the arena panel sits beside the heatmap
    # The best model on a task is green, the worst red (mmlu: SmolLM2 0.32 > speedrun 0.25).
    pixels = heatmap_only.convert("RGB")
    greens = sum(1 for r, g, b in pixels.getdata() if g > 90 and r < 60 and b < 80)
    reds = sum(1 for r, g, b in pixels.getdata() if r > 150 and g < 40 and b < 60)
    assert greens > 1000 and reds > 1000


def test_html_page_is_self_contained_and_escaped(tmp_path):
    EvalResults("x", "<script>alert(1)</script>", 10, {"t": TaskResult("acc", 0.5, 0.1, 4)}).save(tmp_path / "r.json")
    board = build_board(load_all([tmp_path / "r.json"]))
    png = render_png(board)
    page = render_html(board, png)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page          # nothing to fetch
    encoded = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(encoded) == png
    assert "<td class=\"num\">50.0</td>" in page


def test_serve_answers_the_page(tmp_path):
    port = free_port()
    server = serve_html("<p>board</p>", port=port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.read() == b"<p>board</p>" and "text/html" in response.headers["Content-Type"]
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(UserError, match="cannot serve the leaderboard"):
        taken = serve_html("x", port=free_port())
        try:
            serve_html("x", port=taken.server_address[1])
        finally:
            taken.server_close()


def test_cli_writes_html_and_png(tmp_path, capsys, monkeypatch):
    write_results(tmp_path)
    write_arena(tmp_path / "artifacts/arena/battles.sqlite")
    monkeypatch.chdir(tmp_path)
    assert main(["leaderboard", "--html", "out/board.html", "--png", "out/board.png", "--bootstrap", "30"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "speedrun-gpt" in out and "arena (BT)" in out
    assert (tmp_path / "out/board.html").read_text().count("<tr>") == 3
    assert Image.open(tmp_path / "out/board.png").format == "PNG"
    # Explicit paths: a folder and a file; --no-arena drops the column's values.
    assert main(["leaderboard", "runs", "artifacts/eval/smollm2.json", "--no-arena"]) == 0
    assert "1  smollm2-135m-instruct" in capsys.readouterr().out


@pytest.mark.parametrize("setup, argv, message", [
    (lambda root: None, ["leaderboard"], "no eval results found"),
    (lambda root: None, ["leaderboard", "missing.json"], "does not exist"),
    (lambda root: (root / "bad.json").write_text("{not json"), ["leaderboard", "bad.json"],
     "not an lmforge eval results file"),
    (lambda root: (root / "old.json").write_text('{"format": "lmforge-eval/0", "tasks": {}}'), ["leaderboard", "old.json"],
     "not an lmforge eval results file"),
    (lambda root: (root / "log.sqlite").write_bytes(b"garbage" * 200), ["leaderboard", "--arena-log", "log.sqlite"],
     "not a readable arena log"),
    (lambda root: None, ["leaderboard", "--arena-log", "nope.sqlite"], "does not exist"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, monkeypatch, setup, argv, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_one_row_per_run_however_it_was_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/r").mkdir(parents=True)
    EvalResults("runs/r", "r", 5, {"a": TaskResult("acc", 0.5, None, 2)}).save(tmp_path / "one.json")
    EvalResults(str(tmp_path / "runs/r") + "/", "r", 5, {"b": TaskResult("acc", 0.7, None, 2)}).save(tmp_path / "two.json")
    [row] = build_board(load_all([tmp_path / "one.json", tmp_path / "two.json"])).rows
    assert sorted(row.scores) == ["a", "b"] and row.average == pytest.approx(60.0)


def test_an_empty_default_arena_log_is_skipped(tmp_path, capsys, monkeypatch):
    write_results(tmp_path)
    BattleLog(tmp_path / "artifacts/arena/battles.sqlite")          # created, no battles yet
    monkeypatch.chdir(tmp_path)
    assert main(["leaderboard"]) == 0
    assert main(["leaderboard", "--arena-log", "artifacts/arena/battles.sqlite"]) == 2    # named: must have battles
    assert "has no battles" in capsys.readouterr().err
