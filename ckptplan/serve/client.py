"""Ask a ``ckptplan serve`` server for a plan: standard library only (no extra to install on a rank).

``solve_remote`` sends the traced graph(s) gzip-compressed, waits out a busy server (503 with
Retry-After) within its deadline, and returns the ``Plan`` the server stored: saved, its file is
byte-identical to a local ``solve`` with the same options. The server's refusals come back as the
errors a local solve raises (``InfeasibleBudget`` with ``minimum_bytes``, ``BudgetError``,
``InputError``, ``SolverTimeout``); an unreachable or failing server raises ``ServerError``.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any, Sequence

import yaml

from ..errors import BudgetError, CkptplanError, InfeasibleBudget, InputError, SolverTimeout
from ..graph import Graph
from ..plan import Plan, plan_from_dict
from . import wire

TOKEN_ENV = "CKPTPLAN_TOKEN"
DEFAULT_DEADLINE_S = 300.0


class ServerError(CkptplanError):
    """The server could not be reached or failed; the message says which and what to do."""

    exit_code = 8


def request_body(graphs: Graph | Sequence[Graph], budget: int | str, **options: Any) -> bytes:
    """The gzip-compressed JSON body of POST /v1/solve (deterministic: every rank sends the same bytes)."""
    return wire.compress(wire.dumps({"graph": wire.encode(graphs), "budget": budget, **options}))


def solve_remote(
    graphs: Graph | Sequence[Graph],
    budget: int | str,
    *,
    server: str,
    time_limit_s: float = 30.0,
    reserve: float | None = None,
    objective: str = "time",
    gap: float = 0.005,
    rematerialize: bool = True,
    token: str | None = None,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> Plan:
    """The server's plan for ``graphs`` under ``budget`` (see ``planner.solve`` for the options)."""
    body = request_body(
        graphs,
        budget,
        time_limit_s=time_limit_s,
        reserve=reserve,
        objective=objective,
        gap=gap,
        rematerialize=rematerialize,
        deadline_s=deadline_s,
    )
    payload = _ask(server, "/v1/solve", body, token=token, deadline_s=deadline_s)
    plan = plan_from_dict(yaml.safe_load(payload["plan"]), source=f"the plan from {server}")
    return replace(plan, solve_time_s=float(payload.get("solve_seconds", 0.0)))


def sweep_remote(
    graph: Graph,
    budgets: Sequence[int | str],
    *,
    server: str,
    time_limit_s: float = 30.0,
    reserve: float | None = None,
    objective: str = "time",
    rematerialize: bool = True,
    token: str | None = None,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> list:
    """The server's ``compare.sweep`` rows for ``graph`` at ``budgets`` (cached like a solve)."""
    from ..compare import SweepRow

    body = wire.compress(
        wire.dumps(
            {
                "graph": wire.encode(graph),
                "budgets": list(budgets),
                "time_limit_s": time_limit_s,
                "reserve": reserve,
                "objective": objective,
                "rematerialize": rematerialize,
                "deadline_s": deadline_s,
            }
        )
    )
    payload = _ask(server, "/v1/sweep", body, token=token, deadline_s=deadline_s)
    try:
        return [SweepRow(**row) for row in payload["rows"]]
    except (KeyError, TypeError) as e:
        raise ServerError(
            f"the server at {server} answered a sweep this client cannot read ({e}); use the "
            "same ckptplan version on both"
        ) from None


def _ask(server: str, path: str, body: bytes, *, token: str | None, deadline_s: float) -> dict:
    """POST ``body``; wait out 503/504 with Retry-After within the deadline; the 200 answer or a typed error."""
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = server.rstrip("/") + path
    give_up = time.monotonic() + deadline_s
    while True:
        status, payload, retry_after = _post(url, body, headers, timeout=deadline_s + 30)
        if status == 200:
            return payload
        if status in (503, 504) and retry_after is not None and time.monotonic() + retry_after < give_up:
            time.sleep(retry_after * (1 + 0.25 * random.random()))  # spread the ranks' retries apart
            continue
        raise _error(status, payload, server)


def _post(url: str, body: bytes, headers: dict[str, str], *, timeout: float) -> tuple[int, dict, float | None]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"error": "HTTPError", "message": raw.decode(errors="replace")[:300]}
        after = e.headers.get("Retry-After")
        return e.code, payload, float(after) if after and after.isdigit() else None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ServerError(
            f"cannot reach the ckptplan server at {url} ({reason}); is `ckptplan serve` running "
            "there? Or solve locally without --server"
        ) from None
    except ValueError as e:
        raise ServerError(
            f"the server at {url} answered something that is not JSON ({e}); is it a ckptplan server?"
        ) from None


def _error(status: int, payload: dict, server: str) -> CkptplanError:
    name, message = payload.get("error", "HTTPError"), payload.get("message", "")
    if name == "InfeasibleBudget":
        return InfeasibleBudget(  # a server before minimum_proven was sent had proven minimums only
            message,
            budget_bytes=int(payload["budget_bytes"]),
            minimum_bytes=int(payload["minimum_bytes"]),
            minimum_proven=bool(payload.get("minimum_proven", True)),
            minimum_source=str(payload.get("minimum_source", "minimum-peak search")),
            minimum_lower_bytes=int(payload.get("minimum_lower_bytes", 0)),
        )
    typed = {
        "BudgetError": BudgetError,
        "InputError": InputError,
        "SolverTimeout": SolverTimeout,
        "WireError": InputError,
    }.get(name)
    if typed is not None and 400 <= status < 500:
        return typed(message)
    if status == 401:
        return ServerError(f"the server at {server} refused the request: {message}; set {TOKEN_ENV} or --token")
    return ServerError(f"the server at {server} answered {status} {name}: {message}")
