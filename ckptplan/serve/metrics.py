"""GET /metrics: the planner's counters in Prometheus' text format."""

from __future__ import annotations

from .pool import Planner


def prometheus(planner: Planner) -> str:
    m = planner.metrics
    lines = [
        "# HELP ckptplan_requests_total HTTP requests by method, route and status.",
        "# TYPE ckptplan_requests_total counter",
    ]
    for (method, route, status), n in sorted(m.requests.items()):
        lines.append(f'ckptplan_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
    for name, kind, value, text in (
        ("cache_hits_total", "counter", m.cache_hits, "Solve requests answered from the store."),
        ("cache_misses_total", "counter", m.cache_misses, "Solve requests that started a solve."),
        ("singleflight_joins_total", "counter", m.joined, "Solve requests that waited for a running identical solve."),
        ("solves_total", "counter", m.solves, "Solves run by the worker pool."),
        ("solve_seconds_total", "counter", round(m.solve_seconds, 6), "Seconds the solves took, summed."),
        ("rejected_busy_total", "counter", m.rejected_busy, "Solve requests refused with 503 (queue full)."),
        ("deadline_exceeded_total", "counter", m.deadline_exceeded, "Solve requests answered 504."),
        ("queue_depth", "gauge", planner.queue_depth, "Distinct solves waiting or running."),
        ("queue_limit", "gauge", planner.queue_limit, "Distinct solves allowed at once before 503."),
        ("workers", "gauge", planner.workers, "Solver worker processes."),
    ):
        lines += [f"# HELP ckptplan_{name} {text}", f"# TYPE ckptplan_{name} {kind}", f"ckptplan_{name} {value}"]
    return "\n".join(lines) + "\n"
