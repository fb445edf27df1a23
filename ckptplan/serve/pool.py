"""Solves in worker processes: the cache key, single flight, a bounded queue, a deadline per request.

``Planner.solve`` answers a request from the store when it can; otherwise it joins the solve already
running for the same key (single flight: 32 identical concurrent requests cause one solve) or starts
one in the process pool, unless ``queue_limit`` distinct solves are already waiting or running
(``Busy``: the app answers 503 with Retry-After). A request that waits past its deadline gets
``DeadlineExceeded`` (504); its solve goes on and its answer is stored for the retry.

Workers receive the canonical graph document as JSON bytes and return the plan's YAML text: nothing
that a client sent is ever unpickled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from .. import __version__
from ..errors import BudgetError, CkptplanError, InfeasibleBudget, InputError, SolverTimeout
from ..objective import Objective
from . import wire
from .store import Entry, Kind, Status, Store, now

log = logging.getLogger("ckptplan.serve")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """Every option a plan depends on (all in the cache key), as ``planner.solve`` takes them."""

    budget: int | str | tuple[int | str, ...]  # a sweep's budgets, in order
    kind: Kind = Kind.SOLVE
    objective: Objective = Objective.TIME
    time_limit_s: float = 30.0
    reserve: float | None = None
    gap: float = 0.005
    rematerialize: bool = True

    def solve_kwargs(self) -> dict[str, Any]:
        out = {
            "time_limit_s": self.time_limit_s,
            "reserve": self.reserve,
            "objective": self.objective.value,
            "gap": self.gap,
            "rematerialize": self.rematerialize,
        }
        if self.kind is Kind.SWEEP:  # compare.sweep solves at the default gap
            del out["gap"]
        return out


def cache_key(graph_bytes: bytes, fingerprints: list[str], options: Options, torch_version: str) -> str:
    """Content address of a request: the graph document (canonical bytes, so two traces of the same step
    agree; its fingerprints too, for reading), every option, and the ckptplan and torch versions that
    solve it."""
    d = {
        "graph": hashlib.sha256(graph_bytes).hexdigest(),
        "fingerprints": fingerprints,
        **{k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(options).items()},
        "ckptplan": __version__,
        "torch": torch_version,
    }
    return hashlib.sha256(wire.dumps(d)).hexdigest()[:32]


# ---- the worker side (runs in a pool process) -----------------------------------------------------
def _init_worker(parent: int | None = None) -> None:
    import torch

    from .. import planner  # noqa: F401  (imported now, not during the first solve)

    torch.set_num_threads(1)  # a solve is CP-SAT and Python; the pool size is the parallelism
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="ckptplan-parent-watch").start()


def _exit_with(parent: int) -> None:
    """End this worker once the server that started it is gone (killed -9, it cannot say so): a spawned
    worker holds its queue's pipe open itself and would otherwise wait on it forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def run_job(graph_bytes: bytes, options: dict[str, Any]) -> dict[str, Any]:
    """Solve one request in a worker: the plan's YAML and summary (a sweep's rows), or a typed error as a
    payload."""
    from ..compare import sweep
    from ..planner import solve

    started = time.monotonic()
    try:
        graphs = wire.decode(json.loads(graph_bytes))
        budget = options.pop("budget")
        if options.pop("kind") == Kind.SWEEP.value:
            if len(graphs) > 1:
                raise InputError("a sweep takes one traced shape; send one graph")
            rows = sweep(graphs[0], list(budget), **options)
            return {
                "sweep": {
                    "rows": [asdict(r) for r in rows],
                    "forward_flops": graphs[0].forward_flops,
                    "no_checkpointing_peak_bytes": graphs[0].baseline_peak_bytes,
                },
                "seconds": time.monotonic() - started,
            }
        plan = solve(graphs if len(graphs) > 1 else graphs[0], budget, **options)
    except InfeasibleBudget as e:
        return {
            "error": "InfeasibleBudget",
            "message": str(e),
            **_minimum(e),
            "seconds": time.monotonic() - started,
        }
    except (BudgetError, InputError, SolverTimeout) as e:
        return {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - started}
    except Exception as e:  # a planner bug: reported by name and message, the traceback stays in the log
        log.exception("solve failed")
        return {"error": "InternalError", "message": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - started}
    return {
        "yaml": plan.to_yaml(),
        "status": plan.status.value,
        "budget_bytes": plan.budget_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "extra_forward_flops": plan.extra_forward_flops,
        "extra_cost_ns": plan.extra_cost_ns,
        "seconds": plan.solve_time_s,
    }


# ---- the server side ------------------------------------------------------------------------------
class Busy(Exception):
    """The queue of distinct solves is full."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"{retry_after_s}")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline passed before its solve finished (the solve goes on)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    key: str
    graph_bytes: bytes  # canonical graph document
    model: str
    fingerprint: str
    options: Options


@dataclass(slots=True)
class Metrics:
    """Counters for /metrics (only the event loop thread writes them)."""

    requests: dict[tuple[str, str, int], int] = field(default_factory=dict)  # (method, route, status) -> n
    cache_hits: int = 0
    cache_misses: int = 0
    joined: int = 0  # requests that waited for a solve another request started (single flight)
    solves: int = 0
    solve_seconds: float = 0.0
    rejected_busy: int = 0
    deadline_exceeded: int = 0

    def count_request(self, method: str, route: str, status: int) -> None:
        k = (method, route, status)
        self.requests[k] = self.requests.get(k, 0) + 1


class Planner:
    def __init__(self, store: Store, *, workers: int, queue_limit: int, torch_version: str) -> None:
        self.store = store
        self.workers = workers
        self.queue_limit = queue_limit
        self.torch_version = torch_version
        self.metrics = Metrics()
        self.inflight: dict[str, asyncio.Future[Entry]] = {}
        self._warming: list = []
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the server process runs threads (uvicorn, SQLite) that a fork would copy mid-state
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(),),
        )

    def warm_up(self) -> None:
        """Start the worker processes now (each imports torch), not at the first request."""
        self._warming = [self._pool.submit(time.sleep, 0.0) for _ in range(self.workers)]

    @property
    def ready(self) -> bool:
        """Every worker started (``warm_up`` done), so a solve starts at once."""
        return all(f.done() for f in self._warming)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return len(self.inflight)

    async def solve(self, job: Job, *, deadline_s: float) -> tuple[Entry, str]:
        """The entry for ``job`` and how it was found: "hit", "joined" or "solved"."""
        m = self.metrics
        task = self.inflight.get(job.key)
        how = "joined"
        if task is None:
            # no await between this lookup and the registration below: two identical requests cannot
            # both miss (a finished solve is in the store before it leaves ``inflight``)
            entry = self.store.get(job.key)
            if entry is not None:
                m.cache_hits += 1
                return entry, "hit"
            if len(self.inflight) >= self.queue_limit:
                m.rejected_busy += 1
                raise Busy(retry_after_s=max(1, min(60, round(job.options.time_limit_s / 2))))
            m.cache_misses += 1
            task = asyncio.ensure_future(self._run(job))
            key = job.key
            self.inflight[key] = task
            task.add_done_callback(lambda _t: self.inflight.pop(key, None))
            how = "solved"
        else:
            m.joined += 1
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=deadline_s), how
        except asyncio.TimeoutError:
            m.deadline_exceeded += 1
            raise DeadlineExceeded() from None

    async def _run(self, job: Job) -> Entry:
        loop = asyncio.get_running_loop()
        opts = {"budget": job.options.budget, "kind": job.options.kind.value, **job.options.solve_kwargs()}
        try:
            out = await loop.run_in_executor(self._pool, run_job, job.graph_bytes, opts)
        except BrokenProcessPool:
            log.error("a solver worker died; starting a fresh pool")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            out = {
                "error": "WorkerDied",
                "message": "the solver process died (out of memory?); retry the request",
                "seconds": 0.0,
            }
        self.metrics.solves += 1
        self.metrics.solve_seconds += out["seconds"]
        o = job.options
        budget = ",".join(map(str, o.budget)) if isinstance(o.budget, tuple) else str(o.budget)
        common = dict(
            key=job.key,
            kind=o.kind,
            created=now(),
            model=job.model,
            fingerprint=job.fingerprint,
            budget=budget,
            objective=o.objective,
            solve_seconds=round(out["seconds"], 3),
        )
        if "sweep" in out:
            entry = Entry(
                **common,
                budget_bytes=None,
                status=Status.SWEPT,
                predicted_peak_bytes=None,
                extra_forward_flops=None,
                extra_cost_ns=None,
                body=json.dumps(out["sweep"]),
            )
        elif "error" not in out:
            entry = Entry(
                **common,
                budget_bytes=out["budget_bytes"],
                status=Status(out["status"]),
                predicted_peak_bytes=out["predicted_peak_bytes"],
                extra_forward_flops=out["extra_forward_flops"],
                extra_cost_ns=out["extra_cost_ns"],
                body=out["yaml"],
            )
        else:
            status = {
                "InfeasibleBudget": Status.INFEASIBLE,
                "InputError": Status.REFUSED,
                "BudgetError": Status.REFUSED,
            }.get(out["error"])
            payload = {k: v for k, v in out.items() if k != "seconds"}
            entry = Entry(
                **common,
                budget_bytes=out.get("budget_bytes"),
                status=status or Status.REFUSED,
                predicted_peak_bytes=None,
                extra_forward_flops=None,
                extra_cost_ns=None,
                body=json.dumps(payload),
            )
            if status is None:  # a time limit or a crash depends on the moment: answered, never stored
                return entry
        self.store.put(entry)
        return entry


def error_payload(e: CkptplanError) -> dict[str, Any]:
    out: dict[str, Any] = {"error": type(e).__name__, "message": str(e)}
    if isinstance(e, InfeasibleBudget):
        out.update(_minimum(e))
    return out


def _minimum(e: InfeasibleBudget) -> dict[str, Any]:
    """What an InfeasibleBudget says of the minimum, for the client to raise the same error."""
    return {
        "budget_bytes": e.budget_bytes,
        "minimum_bytes": e.minimum_bytes,
        "minimum_proven": e.minimum_proven,
        "minimum_source": e.minimum_source,
        "minimum_lower_bytes": e.minimum_lower_bytes,
    }
