"""The arena's battle log: an append-only SQLite file that every vote goes to.

    log = BattleLog("artifacts/arena/battles.sqlite")
    log.record(BattleRecord(model_a="smollm2", model_b="speedrun", winner="a", judge="human", prompt=..., ...))
    battles = log.battles()          # [ratings.Battle], in the order they were recorded

Why SQLite and these settings:
- **Append-only**: triggers refuse UPDATE and DELETE, so a rating can always be recomputed from
  every vote ever cast (Elo depends on their order, which the row id keeps).
- **Survives a crash**: each vote is one committed transaction. In WAL mode with synchronous=FULL
  a commit is on disk (fsync'd) when `record` returns; a process killed before that loses only the
  vote it was writing, and SQLite rolls the half-written transaction back on the next open.
- **Concurrent voters**: WAL lets readers proceed while one writer appends; writers queue on
  SQLite's lock (busy_timeout) instead of failing. Each call opens its own connection, so threads
  (the web page's) and processes can share one file.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .ratings import WINNERS, Battle

SCHEMA_VERSION = 1
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS battles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    model_a TEXT NOT NULL,        -- the model shown on the left (position A)
    model_b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN {WINNERS}),
    judge TEXT NOT NULL,          -- "human", or the judge model's name
    prompt TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    session TEXT NOT NULL DEFAULT ''
);
CREATE TRIGGER IF NOT EXISTS battles_no_update BEFORE UPDATE ON battles
    BEGIN SELECT RAISE(ABORT, 'the battle log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS battles_no_delete BEFORE DELETE ON battles
    BEGIN SELECT RAISE(ABORT, 'the battle log is append-only'); END;
PRAGMA user_version = {SCHEMA_VERSION};
"""
DEFAULT_LOG = Path("artifacts/arena/battles.sqlite")


@dataclass
class BattleRecord:
    model_a: str
    model_b: str
    winner: str
    judge: str
    prompt: str
    answer_a: str = ""
    answer_b: str = ""
    session: str = ""
    time: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    id: int | None = None


class BattleLog:
    """One SQLite file of battles. Opening it creates it (and its folder) if needed."""

    def __init__(self, path: str | Path, create: bool = True, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        if not self.path.exists():
            if not create:
                raise UserError(f"battle log {self.path} does not exist; run `lmforge arena battle` or "
                                "`lmforge arena web` first, or pass the right --log")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            self._check(db)

    def _bad(self, error: Exception) -> UserError:
        return UserError(f"battle log {self.path} is not a readable arena log ({error}); "
                         "pass another --log, or move the broken file away to start a new one")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as error:
            raise self._bad(error) from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")      # a returned commit is on disk
            yield db
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.IntegrityError):
                raise
            raise self._bad(error) from None
        finally:
            db.close()

    def _check(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == 0 and not tables:
            db.executescript(SCHEMA)
        elif version != SCHEMA_VERSION or "battles" not in tables:
            raise self._bad(ValueError(f"schema version {version}, tables {sorted(tables)}"))

    def record(self, record: BattleRecord) -> int:
        """Append one battle (one transaction, on disk when this returns); returns its id."""
        if record.winner not in WINNERS:
            raise UserError(f"vote {record.winner!r} is not one of {WINNERS}")
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO battles (time, model_a, model_b, winner, judge, prompt, answer_a, answer_b, session) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.time, record.model_a, record.model_b, record.winner, record.judge, record.prompt,
                 record.answer_a, record.answer_b, record.session))
            record.id = int(cursor.lastrowid)
        return record.id

    def records(self) -> list[BattleRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT id, time, model_a, model_b, winner, judge, prompt, answer_a, answer_b, session "
                              "FROM battles ORDER BY id").fetchall()
        return [BattleRecord(id=r[0], time=r[1], model_a=r[2], model_b=r[3], winner=r[4], judge=r[5], prompt=r[6],
                             answer_a=r[7], answer_b=r[8], session=r[9]) for r in rows]

    def battles(self, judge: str | None = None) -> list[Battle]:
        """The log as rating input, in recorded order (optionally one judge's battles only)."""
        return [Battle(r.model_a, r.model_b, r.winner) for r in self.records()  # type: ignore[arg-type]
                if judge is None or r.judge == judge]

    def __len__(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM battles").fetchone()[0])

    def integrity(self) -> str:
        """SQLite's own check of the file: "ok" when it is intact."""
        with self._connect() as db:
            return str(db.execute("PRAGMA integrity_check").fetchone()[0])
