"""The battle log: append-only, every committed vote survives a killed writer, concurrent voters
(threads and processes) lose nothing, and a broken file is a clear UserError."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.eval.battle_log import BattleLog, BattleRecord
from lmforge.eval.ratings import Battle

REPO = Path(__file__).resolve().parent.parent

# A voter process: appends votes as fast as it can and prints each id once `record` returned.
VOTER = """
import sys
from lmforge.eval.battle_log import BattleLog, BattleRecord
log = BattleLog(sys.argv[1])
n = 0
while True:
    n += 1
    vote_id = log.record(BattleRecord(model_a="x", model_b="y", winner="a" if n % 3 else "tie", judge="human",
                                      prompt=f"prompt {n}", answer_a="A" * 2000, answer_b="B" * 2000,
                                      session=sys.argv[2]))
    print(vote_id, flush=True)
    if len(sys.argv) > 3 and n >= int(sys.argv[3]):
        break
"""


def vote(n: int, winner: str = "a", session: str = "") -> BattleRecord:
    return BattleRecord(model_a="x", model_b="y", winner=winner, judge="human", prompt=f"prompt {n}",
                        answer_a="left", answer_b="right", session=session)


def test_records_round_trip_in_order(tmp_path):
    log = BattleLog(tmp_path / "arena" / "battles.sqlite")
    ids = [log.record(vote(n, winner)) for n, winner in enumerate(["a", "b", "tie", "both_bad"])]
    assert ids == [1, 2, 3, 4] and len(log) == 4
    assert log.battles() == [Battle("x", "y", w) for w in ("a", "b", "tie", "both_bad")]
    [first, *_] = log.records()
    assert (first.prompt, first.answer_a, first.answer_b, first.judge) == ("prompt 0", "left", "right", "human")
    # The file is in WAL mode (readers never block the writer).
    with sqlite3.connect(log.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_log_is_append_only(tmp_path):
    log = BattleLog(tmp_path / "battles.sqlite")
    log.record(vote(1))
    db = sqlite3.connect(log.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE battles SET winner = 'b'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM battles")
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO battles (time, model_a, model_b, winner, judge, prompt, answer_a, answer_b) "
                    "VALUES ('t', 'x', 'y', 'left', 'h', 'p', '', '')")
    db.close()
    assert log.battles() == [Battle("x", "y", "a")]


def test_a_bad_vote_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not one of"):
        BattleLog(tmp_path / "battles.sqlite").record(vote(1, winner="left"))


def test_killed_writer_loses_no_recorded_vote(tmp_path):
    """Kill -9 a voter in the middle of writing; every vote whose id it printed is in the log."""
    path = tmp_path / "battles.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    voter = subprocess.Popen([sys.executable, "-c", VOTER, str(path), "crash"], stdout=subprocess.PIPE, text=True,
                             env=env)
    confirmed = []
    try:
        for line in voter.stdout:
            confirmed.append(int(line))
            if len(confirmed) == 40:
                break
    finally:
        voter.send_signal(signal.SIGKILL)    # it is busy writing vote 41 (or later) right now
        voter.wait(timeout=30)
        voter.stdout.close()
    assert voter.returncode == -signal.SIGKILL
    log = BattleLog(path)                    # reopening recovers the interrupted transaction
    assert log.integrity() == "ok"
    stored = {record.id: record for record in log.records()}
    assert set(confirmed) <= set(stored), f"lost votes: {sorted(set(confirmed) - set(stored))}"
    assert all(len(stored[i].answer_a) == 2000 for i in confirmed)     # no torn rows
    log.record(vote(999))                    # and the log takes new votes
    assert max(r.id for r in log.records()) > max(confirmed)


def test_concurrent_voters_lose_nothing(tmp_path):
    """Four threads in this process and two other processes append at once."""
    path = tmp_path / "battles.sqlite"
    log = BattleLog(path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen([sys.executable, "-c", VOTER, str(path), f"proc{k}", "30"],
                                  stdout=subprocess.DEVNULL, env=env) for k in range(2)]
    errors: list[BaseException] = []

    def voter(thread: int) -> None:
        try:
            for n in range(25):
                log.record(vote(n, session=f"thread{thread}"))
        except BaseException as error:   # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=voter, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for process in processes:
        assert process.wait(timeout=120) == 0
    assert not errors
    records = log.records()
    assert len(records) == 4 * 25 + 2 * 30 and len({r.id for r in records}) == len(records)
    sessions = {}
    for record in records:
        sessions[record.session] = sessions.get(record.session, 0) + 1
    assert sessions == {**{f"thread{t}": 25 for t in range(4)}, "proc0": 30, "proc1": 30}


def test_corrupt_log_is_a_user_error(tmp_path):
    path = tmp_path / "battles.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="not a readable arena log"):
        BattleLog(path)


def test_another_sqlite_file_is_a_user_error(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(UserError, match="not a readable arena log"):
        BattleLog(path)


def test_missing_log_when_reading_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        BattleLog(tmp_path / "nope.sqlite", create=False)
