"""The plan cache: one SQLite file (WAL), keyed by content, that survives restarts.

Each row is one finished request: a plan (its YAML file, byte for byte) or a deterministic refusal
(``InfeasibleBudget``, a bad option), with the columns the review page lists. A row is written in one
transaction, so a process killed at any moment leaves either the whole row or none (SQLite's journal
rolls a torn write back when the file is next opened).

Opening checks the file (``PRAGMA quick_check`` and the schema); a file that is not a sound store is
renamed ``PATH.corrupt-N`` beside it, reported in ``Store.recovered`` (and by ``/healthz`` and the log),
and a fresh store takes its place.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..objective import Objective

log = logging.getLogger("ckptplan.serve")

SCHEMA = 1
_COLUMNS = (
    "key",
    "kind",
    "created",
    "model",
    "fingerprint",
    "budget",
    "budget_bytes",
    "objective",
    "status",
    "predicted_peak_bytes",
    "extra_forward_flops",
    "extra_cost_ns",
    "solve_seconds",
    "body",
)


class Kind(str, Enum):
    SOLVE = "solve"  # one plan (planner.solve)
    SWEEP = "sweep"  # ckptplan and the baseline policies at several budgets (compare.sweep)


class Status(str, Enum):
    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    INFEASIBLE = "infeasible"  # the budget is below any plan's peak: body holds the error payload
    REFUSED = "refused"  # the planner refused the input (InputError): body holds the error payload
    SWEPT = "swept"  # a sweep: body holds its rows as JSON


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    key: str
    kind: Kind
    created: float  # unix seconds
    model: str
    fingerprint: str
    budget: str  # as given (a sweep's, comma-separated)
    budget_bytes: int | None
    objective: Objective
    status: Status
    predicted_peak_bytes: int | None
    extra_forward_flops: int | None
    extra_cost_ns: int | None
    solve_seconds: float
    body: str  # the plan's YAML, or the error payload as JSON

    @property
    def ok(self) -> bool:
        return self.status in (Status.OPTIMAL, Status.FEASIBLE, Status.SWEPT)

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)


class Store:
    """Thread-safe access to the cache file (one connection, one lock: every statement is short)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.recovered: str | None = None  # where a corrupt file was moved, when one was
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create the folder of the plan store {self.path} ({e})") from None
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.OperationalError as e:  # cannot open or lock it: the file is not at fault
            raise InputError(
                f"cannot open the plan store {self.path} ({e}); give --store a writable file "
                "path that no other server uses"
            ) from None
        except sqlite3.DatabaseError as e:
            self.recovered = str(self._set_aside())
            log.error("store %s is corrupt (%s): moved to %s, starting a fresh store", self.path, e, self.recovered)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses nothing committed
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if version == 0 and not tables:
                with db:
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("""CREATE TABLE plans (
                        key TEXT PRIMARY KEY, kind TEXT NOT NULL, created REAL NOT NULL, model TEXT NOT NULL,
                        fingerprint TEXT NOT NULL, budget TEXT NOT NULL, budget_bytes INTEGER,
                        objective TEXT NOT NULL, status TEXT NOT NULL, predicted_peak_bytes INTEGER,
                        extra_forward_flops INTEGER, extra_cost_ns INTEGER, solve_seconds REAL NOT NULL,
                        body TEXT NOT NULL)""")
                    db.execute("CREATE INDEX plans_created ON plans(created)")
                    db.execute(f"PRAGMA user_version={SCHEMA}")
            elif version != SCHEMA or "plans" not in tables:
                raise sqlite3.DatabaseError(
                    f"not a ckptplan store of schema {SCHEMA} (user_version {version}, tables {sorted(tables)})"
                )
        except BaseException:
            db.close()
            raise
        return db

    def _set_aside(self) -> Path:
        n = 1
        while (dest := self.path.with_name(f"{self.path.name}.corrupt-{n}")).exists():
            n += 1
        self.path.rename(dest)
        for suffix in ("-wal", "-shm"):  # the journal belongs to the moved file, not to the fresh one
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                side.rename(dest.with_name(dest.name + suffix))
        return dest

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, key: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM plans WHERE key = ?", (key,)).fetchone()
        return _entry(row) if row else None

    def put(self, entry: Entry) -> None:
        values = tuple(_column(getattr(entry, c)) for c in _COLUMNS)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                f"INSERT OR REPLACE INTO plans ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                values,
            )

    def recent(self, limit: int = 500) -> list[Entry]:
        """Newest first, for the review page."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM plans ORDER BY created DESC, key LIMIT ?", (limit,)
            ).fetchall()
        return [_entry(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM plans").fetchone()[0]


def _entry(row: tuple) -> Entry:
    d = dict(zip(_COLUMNS, row))
    d["kind"], d["objective"], d["status"] = Kind(d["kind"]), Objective(d["objective"]), Status(d["status"])
    return Entry(**d)


def _column(value: Any) -> Any:
    """An entry's field as its column holds it: an enum by its value."""
    return value.value if isinstance(value, Enum) else value


def now() -> float:
    return round(time.time(), 3)
