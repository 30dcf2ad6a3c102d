"""`lmforge leaderboard`: the table of every evaluated model (and the arena), as text, HTML and PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import HelpFormatter, check_port, is_loopback
from ..errors import UserError
from .battle_log import DEFAULT_LOG, BattleLog

EXAMPLES = """example:
  lmforge leaderboard                                   # runs/*/eval/*.json, artifacts/eval/*.json, the arena log
  lmforge leaderboard results/a.json runs/speedrun --html board.html --png board.png
  lmforge leaderboard --serve                           # then open http://127.0.0.1:7862"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("An Open-LLM-Leaderboard-style table: one column per task, the average, parameters, "
                          "the arena's Bradley-Terry rating and the date, for every eval results file found "
                          "(runs/*/eval/*.json and artifacts/eval/*.json) or given.")
    parser.epilog = EXAMPLES
    parser.formatter_class = HelpFormatter
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="results files from `lmforge eval`, or folders holding them (default: the usual places)")
    parser.add_argument("--arena-log", default=None, metavar="FILE",
                        help=f"battle log for the arena column (default: {DEFAULT_LOG} when it exists)")
    parser.add_argument("--no-arena", action="store_true", help="leave the arena ratings out")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap rounds for the arena intervals")
    parser.add_argument("--html", default=None, metavar="OUT", help="write a static HTML page (figure embedded)")
    parser.add_argument("--png", default=None, metavar="OUT", help="write the tasks x models heatmap + arena figure")
    parser.add_argument("--serve", action="store_true", help="serve the HTML page until Ctrl-C")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7862)
    parser.set_defaults(func=run)


def load_board(args: argparse.Namespace):
    from .arena_command import ratings_table
    from .leaderboard import build_board, find_results, load_all

    results = load_all(find_results(args.paths))
    arena = []
    if not args.no_arena:
        log = Path(args.arena_log) if args.arena_log else DEFAULT_LOG
        # The default log is optional (and may hold no battles yet); a log you name must be usable.
        if args.arena_log or (log.exists() and len(BattleLog(log, create=False))):
            arena = ratings_table(str(log), rounds=args.bootstrap)
    if not results and not arena:
        where = " ".join(map(str, args.paths)) if args.paths else "runs/*/eval/*.json or artifacts/eval/*.json"
        raise UserError(f"no eval results found in {where} and no arena battles; run `lmforge eval --model REF "
                        "--tasks ...` (or `lmforge arena`) first, or pass results files")
    return build_board(results, arena)


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_open
    from .leaderboard import format_table, render_html, render_png, serve_html

    check_port(args.port)
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap} is negative; use 0 (no intervals) or more rounds")
    board = load_board(args)
    print(format_table(board))
    png = render_png(board, args.png) if (args.png or args.html or args.serve) else None
    if args.png:
        print(f"wrote {args.png}")
    page = render_html(board, png) if (args.html or args.serve) else None
    if args.html:
        with atomic_open(args.html, "w", encoding="utf-8") as handle:
            handle.write(page)
        print(f"wrote {args.html}")
    if args.serve:
        server = serve_html(page, args.host, args.port)
        if not is_loopback(args.host):
            print(f"note: listening on {args.host}: anyone who can reach this machine can read the page")
        print(f"leaderboard at http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0
