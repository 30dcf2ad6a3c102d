"""lmforge.track: metrics.jsonl (+ TensorBoard, W&B), a live progress bar, and reading runs back.

    Tracker(run_dir, config, tensorboard=False, wandb=False, ...)   log / log_text / close
    TrainProgress(total_steps, budget_s=...)                           update / print / close
    plot_runs(run_dirs, out_path)                                      the figure behind `lmforge runs plot`
"""
from .progress import TrainProgress
from .runs import list_runs, plot_runs, read_metrics, resolve_run
from .tracker import Tracker, read_jsonl, truncate_logs

__all__ = ["Tracker", "TrainProgress", "list_runs", "plot_runs", "read_jsonl", "read_metrics", "resolve_run",
           "truncate_logs"]
