"""The leaderboard: every eval results file and arena rating found, in one Open-LLM-style table.

    board = build_board(load_all(find_results()), arena=arena_ratings("artifacts/arena/battles.sqlite"))
    print(format_table(board))
    Path("leaderboard.html").write_text(render_html(board, png=render_png(board)))

- Rows are models (one per `model` reference: several results files of one model merge, the
  newest result of each task wins). Columns: one per task (its primary metric), the average,
  parameters, the arena rating and the newest date.
- The average, like the Open LLM Leaderboard's, is the mean of the "higher is better" scores (in
  percent); bits-per-byte and perplexity columns (lower is better, marked with a down arrow) are
  shown but left out of it. A model missing some of those tasks gets an average over the ones it
  has, marked with `*`, and ranked below the models that have them all.
- The PNG is a tasks x models heatmap (colour = how the model ranks on that task, scaled from the
  worst to the best model; the number is the raw score) beside the arena's Bradley-Terry ratings
  with their 95% bootstrap intervals.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from .results import LOWER_IS_BETTER, EvalResults, load_results

DEFAULT_GLOBS = ("runs/*/eval/*.json", "artifacts/eval/*.json")


@dataclass
class Score:
    metric: str
    value: float
    stderr: float | None
    n: int


@dataclass
class Row:
    model: str                         # display name
    ref: str                           # the reference it was loaded from
    parameters: int | None
    date: str
    scores: dict[str, Score] = field(default_factory=dict)
    arena: dict[str, Any] | None = None   # a row of arena_command.ratings_table
    average: float | None = None
    complete: bool = True              # the average covers every averaged column


@dataclass
class Board:
    tasks: list[tuple[str, str]]       # (task, metric), in column order
    rows: list[Row]

    def averaged(self, task: str, metric: str) -> bool:
        return metric not in LOWER_IS_BETTER


def find_results(paths: Sequence[str | Path] = (), root: str | Path = ".") -> list[Path]:
    """The results files under `paths` (files, or folders searched for *.json), else the defaults."""
    found: list[Path] = []
    if not paths:
        for pattern in DEFAULT_GLOBS:
            found += sorted(p for p in Path(root).glob(pattern) if _looks_like_results(p))
        return found
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*.json") if _looks_like_results(p))
        else:
            raise UserError(f"results path '{path}' does not exist; pass results files written by `lmforge eval`, "
                            "or folders holding them")
    return found


def _looks_like_results(path: Path) -> bool:
    """In a folder, only files that say they are eval results (a run also holds config JSON)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return '"lmforge-eval/' in handle.read(200)
    except (OSError, UnicodeDecodeError):
        return False


def load_all(files: Sequence[Path]) -> list[EvalResults]:
    return [load_results(path) for path in dict.fromkeys(Path(f).resolve() for f in files)]


def model_key(ref: str) -> str:
    """One row per model: "runs/x", "./runs/x/" and "/abs/runs/x" are the same run."""
    path = Path(ref)
    return str(path.resolve()) if path.exists() else ref


def build_board(results: Sequence[EvalResults], arena: Sequence[dict[str, Any]] = ()) -> Board:
    """Merge results per model, attach arena ratings by name, compute the averages, sort."""
    rows: dict[str, Row] = {}
    newest: dict[tuple[str, str], str] = {}          # (model, task) -> date of the score kept
    for result in sorted(results, key=lambda r: r.date):
        key = model_key(result.model)
        row = rows.setdefault(key, Row(result.model_name, result.model, result.parameters, result.date))
        row.date = max(row.date, result.date)
        row.parameters = result.parameters or row.parameters
        for task, t in result.tasks.items():
            if result.date >= newest.get((key, task), ""):
                newest[(key, task)] = result.date
                row.scores[task] = Score(t.metric, t.value, t.stderr, t.n)
    for rating in arena:
        match = [row for row in rows.values() if rating["model"] in (row.model, row.ref, Path(row.ref).name)]
        if match:
            match[0].arena = rating
        else:
            rows[rating["model"]] = Row(rating["model"], rating["model"], None, "", arena=rating)
    tasks = sorted({(task, score.metric) for row in rows.values() for task, score in row.scores.items()})
    board = Board(tasks, list(rows.values()))
    averaged = [task for task, metric in tasks if board.averaged(task, metric)]
    for row in board.rows:
        values = [row.scores[t].value for t in averaged if t in row.scores and math.isfinite(row.scores[t].value)]
        row.average = 100 * sum(values) / len(values) if values else None
        row.complete = len(values) == len(averaged)
    # Like the Open LLM Leaderboard, a model with every task beats any model missing some (its
    # average would skip its weak tasks); then by average, then by arena rating.
    board.rows.sort(key=lambda r: (r.average is None, not r.complete, -(r.average or 0.0),
                                   -(r.arena["bt"] if r.arena else -math.inf), r.model))
    return board


# ----------------------------------------------------------------------------------------- output


def human_count(n: int | None) -> str:
    if not n:
        return "-"
    from ..serve.web_backends import human_count as count

    return count(n)


def cell(score: Score | None, metric: str) -> str:
    if score is None or not math.isfinite(score.value):
        return "-"
    if metric in LOWER_IS_BETTER:
        return f"{score.value:.3f}"
    return f"{100 * score.value:.1f}"


def header(task: str, metric: str) -> str:
    return f"{task} {'↓' if metric in LOWER_IS_BETTER else ''}".strip()


def table_rows(board: Board) -> tuple[list[str], list[list[str]]]:
    """The table as strings: header and one list per model (shared by the terminal and HTML)."""
    head = ["#", "model", "average", *[header(t, m) for t, m in board.tasks], "arena (BT)", "params", "date"]
    body = []
    for rank, row in enumerate(board.rows, 1):
        average = "-" if row.average is None else f"{row.average:.1f}{'' if row.complete else '*'}"
        arena = "-"
        if row.arena:
            arena = f"{row.arena['bt']:.0f}"
            if row.arena.get("lower") is not None:
                arena += f" ({row.arena['lower']:.0f}-{row.arena['upper']:.0f})"
        body.append([str(rank), row.model, average, *[cell(row.scores.get(t), m) for t, m in board.tasks],
                     arena, human_count(row.parameters), row.date[:10] or "-"])
    return head, body


NOTE = ("Scores in percent (higher is better); ↓ columns (bits per byte, perplexity) are lower-is-better and "
        "not averaged; * = average over the tasks this model has. Arena: Bradley-Terry rating with its 95% "
        "bootstrap interval.")


def format_table(board: Board) -> str:
    head, body = table_rows(board)
    widths = [max(len(r[k]) for r in [head, *body]) for k in range(len(head))]
    lines = ["  ".join(h.ljust(w) if k == 1 else h.rjust(w) for k, (h, w) in enumerate(zip(row, widths)))
             for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ["", NOTE])


def render_png(board: Board, path: str | Path | None = None) -> bytes:
    """The figure as PNG bytes (and written to `path` if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rated = [row for row in board.rows if row.arena]
    panels = (1 if board.tasks else 0) + (1 if rated else 0)
    if panels == 0:
        raise UserError("the leaderboard is empty: no eval results and no arena ratings; run `lmforge eval` "
                        "or `lmforge arena` first, or pass results files")
    models = [row.model for row in board.rows]
    figure, axes = plt.subplots(1, panels, figsize=(4 + 1.3 * len(board.tasks) + 5 * (panels - 1),
                                                   1.5 + 0.45 * len(models)), squeeze=False)
    axes = list(axes[0])
    if board.tasks:
        ax = axes.pop(0)
        values = np.array([[row.scores[t].value if t in row.scores else np.nan for t, _ in board.tasks]
                           for row in board.rows], dtype=float)                         # [models, tasks]
        colour = np.full_like(values, np.nan)
        for k, (_, metric) in enumerate(board.tasks):
            column = values[:, k]
            lo, hi = np.nanmin(column), np.nanmax(column)
            scaled = (column - lo) / (hi - lo) if hi > lo else np.where(np.isnan(column), np.nan, 0.5)
            colour[:, k] = 1 - scaled if metric in LOWER_IS_BETTER else scaled
        cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#eeeeee")    # grey: a task the model lacks
        ax.imshow(np.ma.masked_invalid(colour), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (i, k), value in np.ndenumerate(values):
            if not np.isfinite(value):
                ax.text(k, i, "-", ha="center", va="center", fontsize=9, color="#888888")
            else:
                metric = board.tasks[k][1]
                ax.text(k, i, f"{value:.3f}" if metric in LOWER_IS_BETTER else f"{100 * value:.1f}",
                        ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(board.tasks)), [header(t, m) for t, m in board.tasks], rotation=30, ha="right")
        ax.set_yticks(range(len(models)), models)
        ax.set_title("eval scores (colour: best to worst per task)")
    if rated:
        ax = axes.pop(0)
        rated = sorted(rated, key=lambda r: r.arena["bt"])
        y = np.arange(len(rated))
        bt = np.array([r.arena["bt"] for r in rated])
        has_ci = all(r.arena.get("lower") is not None for r in rated)
        if has_ci:
            errors = np.array([[r.arena["bt"] - r.arena["lower"], r.arena["upper"] - r.arena["bt"]] for r in rated]).T
            ax.errorbar(bt, y, xerr=errors, fmt="o", capsize=4)
        else:
            ax.plot(bt, y, "o")
        ax.set_yticks(y, [r.model for r in rated])
        ax.set_xlabel("Bradley-Terry rating" + (" (95% bootstrap interval)" if has_ci else ""))
        ax.set_title("arena")
        ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    data = buffer.getvalue()
    if path is not None:
        from ..io import atomic_open

        with atomic_open(path, "wb") as handle:
            handle.write(data)
    return data


def render_html(board: Board, png: bytes | None = None, title: str = "lmforge leaderboard") -> str:
    """A self-contained page (styles inline, the figure embedded): no request leaves it."""
    head, body = table_rows(board)
    esc = html.escape
    numeric = set(range(2, len(head)))
    thead = "".join(f"<th>{esc(h)}</th>" for h in head)
    rows = "\n".join("<tr>" + "".join(f'<td class="{"num" if k in numeric else ""}">{esc(v)}</td>'
                                      for k, v in enumerate(row)) + "</tr>" for row in body)
    figure = (f'<img alt="eval scores heatmap and arena ratings" src="data:image/png;base64,'
              f'{base64.b64encode(png).decode()}">' if png else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 4px 10px; border-bottom: 1px solid #ddd; }}
th {{ background: #f3f3f3; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; margin-top: 1.5em; }}
p.note {{ color: #555; max-width: 60em; }}
</style></head>
<body>
<h1>{esc(title)}</h1>
<table id="leaderboard"><thead><tr>{thead}</tr></thead>
<tbody>
{rows}
</tbody></table>
<p class="note">{esc(NOTE)}</p>
{figure}
</body></html>
"""


def serve_html(page: str, host: str = "127.0.0.1", port: int = 7862):
    """An HTTP server answering GET / with `page`; call .serve_forever() (or run it in a thread)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = page.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:                        # noqa: N802 (http.server's name)
            if self.path not in ("/", "/index.html"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:      # quiet
            pass

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as error:
        raise UserError(f"cannot serve the leaderboard on {host}:{port} ({error.strerror or error}); "
                        "pick a free port with --port") from None
