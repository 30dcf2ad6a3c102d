"""Read runs back: find them, summarise them (`lmforge runs list`) and plot them (`lmforge runs plot`).

A run is a directory with a `metrics.jsonl` (written by `Tracker`); its `config.yaml` (written by
the trainer) says what was trained. Train rows carry `loss`, `lr`, `tokens_per_s`, ...; eval rows
carry `val_loss`, `val_bpb`, ... Both are keyed by `step`.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..io import atomic_path, ensure_writable_dir
from .tracker import METRICS_FILE, read_jsonl

# Any of these in a run directory means the run completed (the trainer writes the final
# checkpoint to `final/`; the speedrun writes a report).
FINISHED_MARKERS = ("model.safetensors", "report.md", "report.json")   # the trainer exports model.safetensors at the end

# Plot panels: (title, y keys drawn as lines, y keys drawn as markers). Panels with no data in
# any run are left out, so a BERT run gets an MLM-accuracy panel and a GPT run does not.
PANELS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("loss", ("loss",), ("val_loss",)),
    ("learning rate", ("lr",), ()),
    ("throughput (tokens/s)", ("tokens_per_s",), ()),
    ("val bits per byte", (), ("val_bpb",)),
    ("val MLM accuracy", (), ("val_mlm_accuracy",)),
    ("grad norm", ("grad_norm",), ()),
    ("MFU", ("mfu",), ()),
    ("memory (GB)", ("memory_gb",), ()),
]


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's metrics rows, with a clear error if it has none."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"run '{run_dir}' has no {METRICS_FILE}; give a run directory written by "
                        "`lmforge pretrain` (see `lmforge runs list`)")
    return read_jsonl(path)


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Every directory under `root` (or `root` itself) that has a metrics.jsonl, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"runs root '{root}' is not a directory; train a model first "
                        "(lmforge pretrain) or pass --root with the folder that holds your runs")
    return sorted(path.parent for path in root.rglob(METRICS_FILE) if path.is_file())


def resolve_run(ref: str | os.PathLike, root: str | os.PathLike = "runs") -> Path:
    """A run given as a path, or as a name under `root`."""
    candidates = (Path(ref), Path(root) / ref)
    for candidate in candidates:
        if (candidate / METRICS_FILE).is_file():
            return candidate
    for candidate in candidates:
        if candidate.is_dir():
            read_metrics(candidate)  # raises the "no metrics.jsonl" error naming this directory
    known = []
    if Path(root).is_dir():
        known = [run.relative_to(root).as_posix() for run in find_runs(root)]
    hint = f"; runs under '{root}': {', '.join(known)}" if known else f"; no runs under '{root}' (pass --root)"
    raise UserError(f"run '{ref}' is neither a run directory nor a run name{hint}")


def _number(value: Any, finite: bool = True) -> float | None:
    """A metric value as a float, or None when it is not a number.

    metrics.jsonl may be hand-edited or damaged: `"loss": "y"`, `true`, a list or a 400-digit
    integer is skipped for that figure instead of breaking the table. JSON reads 1e999 as infinity
    and writes a diverged loss as NaN: with finite=False those are kept (a table should show that
    a run diverged), with finite=True (steps, counts, plots) they are skipped too.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:   # an int too large for a float (JSON allows any number of digits)
        return None
    return number if not finite or math.isfinite(number) else None


def _last(rows: list[dict[str, Any]], key: str, finite: bool = True) -> float | None:
    """The latest numeric value of `key`."""
    for row in reversed(rows):
        value = _number(row.get(key), finite)
        if value is not None:
            return value
    return None


def _best(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [value for value in (_number(row.get(key)) for row in rows) if value is not None]
    return min(values) if values else None


def _config_path(run_dir: Path) -> Path | None:
    """The run's config.yaml, else the one saved with its latest checkpoint."""
    if (run_dir / "config.yaml").is_file():
        return run_dir / "config.yaml"
    saved = sorted(run_dir.glob("checkpoints/step-*/config.yaml"))
    return saved[-1] if saved else None


def _config_summary(run_dir: Path) -> tuple[str | None, str | None]:
    """(objective, model) from the run's config.yaml, whichever the config states.

    Pretraining configs name no objective: the model's arch decides it (gpt -> clm, bert -> mlm).
    """
    path = _config_path(run_dir)
    if path is None:
        return None, None
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError, RecursionError):
        return None, None   # the table shows "-": a damaged config must not hide the run
    if not isinstance(config, dict):
        return None, None
    sections = [config] + [value for value in config.values() if isinstance(value, dict)]
    objective = next((s["objective"] for s in sections if isinstance(s.get("objective"), str)), None)
    model = config.get("model") or config.get("preset")
    if objective is None and isinstance(model, dict):
        objective = {"gpt": "clm", "bert": "mlm"}.get(str(model.get("arch")))
    if isinstance(model, dict):
        name = model.get("preset") or model.get("name")
        if name is None and "arch" in model:
            name = f"{model['arch']} {model.get('n_layers', '?')}L d{model.get('d_model', '?')}"
        model = name
    return objective, (str(model) if model is not None else None)


@dataclass
class RunSummary:
    name: str
    path: Path
    objective: str | None
    model: str | None
    last_step: int | None
    last_loss: float | None
    best_val_loss: float | None
    val_bpb: float | None
    tokens_seen: int | None
    finished: bool
    modified: float

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        return datetime.datetime.fromtimestamp(self.modified).strftime("updated %m-%d %H:%M")


def summarize_run(run_dir: str | os.PathLike, name: str | None = None) -> RunSummary:
    run_dir = Path(run_dir)
    # Every row the tracker writes has a step; a row without a finite one is damaged: skipped whole.
    rows = [row for row in read_metrics(run_dir) if _number(row.get("step")) is not None]
    objective, model = _config_summary(run_dir)
    steps = [_number(row["step"]) for row in rows]
    tokens_seen = _last(rows, "tokens_seen")
    return RunSummary(
        name=name or run_dir.name, path=run_dir, objective=objective, model=model,
        last_step=int(max(steps)) if steps else None,
        last_loss=_last(rows, "loss", finite=False),
        best_val_loss=_best(rows, "val_loss"),
        # bpb of the best-val-loss eval would hide a later regression; the latest is what the model is.
        val_bpb=_last(rows, "val_bpb", finite=False),
        tokens_seen=int(tokens_seen) if tokens_seen is not None else None,
        finished=any((run_dir / marker).exists() for marker in FINISHED_MARKERS),
        modified=(run_dir / METRICS_FILE).stat().st_mtime,
    )


def list_runs(root: str | os.PathLike = "runs") -> list[RunSummary]:
    root = Path(root)
    return [summarize_run(run, name=run.relative_to(root).as_posix() if run != root else run.name)
            for run in find_runs(root)]


def _series(rows: list[dict[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of `key`, skipping rows without it (or without a finite value)."""
    # Eval rows may lack tokens_seen; take it from the train row of the same step.
    tokens_at_step = {}
    if x == "tokens":
        for row in rows:
            step, tokens = _number(row.get("step")), _number(row.get("tokens_seen"))
            if step is not None and tokens is not None:
                tokens_at_step[step] = tokens
    xs, ys = [], []
    for row in rows:
        value, step = _number(row.get(key)), _number(row.get("step"))
        if value is None or step is None:
            continue
        tokens = _number(row.get("tokens_seen"))
        position = step if x == "step" else tokens if tokens is not None else tokens_at_step.get(step)
        if position is None:
            continue
        xs.append(position)
        ys.append(value)
    return xs, ys


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_path: str | os.PathLike | None = None,
              labels: Sequence[str] | None = None, x: str = "step", title: str | None = None):
    """Overlay the curves of several runs; returns the matplotlib Figure (saved if out_path is given).

    One panel per metric present in any run (loss with val as markers, val bpb, learning rate,
    tokens/s, ...); each run keeps one color across panels. `x` is "step" or "tokens".
    The figure is written atomically; its format follows out_path's suffix (.png, .pdf, .svg).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in ("step", "tokens"):
        raise UserError(f"x axis '{x}' is not supported; use 'step' or 'tokens'")
    if not run_dirs:
        raise UserError("no runs given to plot; pass one or more run directories or names")
    run_dirs = [Path(run) for run in run_dirs]
    if labels is None:
        labels = [run.name for run in run_dirs]
        if len(set(labels)) < len(labels):  # same folder name in different places: show the paths
            labels = [run.as_posix() for run in run_dirs]
    labels = list(labels)
    if len(labels) != len(run_dirs):
        raise ValueError("labels must have one entry per run")
    runs = [read_metrics(run) for run in run_dirs]
    for run, rows in zip(run_dirs, runs):
        if not rows:
            raise UserError(f"run '{run}' has an empty {METRICS_FILE}; let it train for a few steps first")

    def has_data(keys: tuple[str, ...]) -> bool:
        return any(_series(rows, key, x)[0] for rows in runs for key in keys)

    panels = [panel for panel in PANELS if has_data(panel[1] + panel[2])]
    if not panels:
        raise UserError(f"runs {', '.join(labels)} have no metrics that can be plotted")
    columns = 1 if len(panels) == 1 else 2
    rows_count = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.5 * columns, 3.6 * rows_count), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows_count, columns, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (panel_title, line_keys, marker_keys) in zip(axes, panels):
        for rows, label, color in zip(runs, labels, colors):
            for key in line_keys:
                xs, ys = _series(rows, key, x)
                if xs:
                    ax.plot(xs, ys, color=color, linewidth=1.2, alpha=0.85, label=_label(label, key))
            for key in marker_keys:
                xs, ys = _series(rows, key, x)
                if xs:
                    ax.plot(xs, ys, color=color, marker="o", markersize=4, linestyle="--", linewidth=0.8,
                            label=_label(label, key))
        ax.set_title(panel_title)
        ax.set_xlabel("step" if x == "step" else "tokens seen")
        ax.grid(alpha=0.3)
        if len(runs) > 1 or marker_keys:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title)
    if out_path is not None:
        save_figure(figure, out_path)
    return figure


def _label(run_label: str, key: str) -> str:
    # In the loss panel, tell train (line) from val (markers); elsewhere the run name is enough.
    if key.startswith("val_"):
        return f"{run_label} (val)"
    return f"{run_label} (train)" if key == "loss" else run_label


def save_figure(figure, out_path: str | os.PathLike) -> Path:
    """Write a matplotlib figure atomically, in the format of the path's suffix."""
    out = Path(out_path)
    fmt = out.suffix.lstrip(".").lower()
    supported = figure.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise UserError(f"cannot write a figure to '{out}'; use one of these suffixes: "
                        f"{', '.join('.' + kind for kind in sorted(supported))}")
    ensure_writable_dir(out.parent)   # a missing/unwritable folder is a UserError, not a traceback
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format=fmt, dpi=120)
    return out
