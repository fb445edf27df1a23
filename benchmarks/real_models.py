"""Real models: ckptplan on architectures nobody here wrote (examples/hf_zoo.py), traced, solved, applied.

Run in the background (10-30 minutes on 2 loaded cores):
    CKPTPLAN_WALL_SLACK=20 nohup python benchmarks/real_models.py --out benchmarks/results/real_models &

For each model of ``hf_zoo.ZOO`` (tiny configs, random weights, CPU): trace one training step; find the
minimum budget (a solve at 1 byte raises ``InfeasibleBudget`` with ``minimum_bytes``, proven or an upper
bound); solve at each ``--budgets`` fraction of the no-checkpointing peak and at that minimum; apply each
plan and run the step from the same parameters, buffers and RNG seed as the unplanned step. A row records
the solve's status and gap, the predicted peak against MemTracker's (``ckptplan.measure.measure_peak``),
whether the measured peak fits the budget, whether gradients and buffers are bitwise equal to the
unplanned step, and the same for a second batch (new inputs, ``factory(seed=1)``: a mixture of experts
then routes tokens differently, and its peak may move), and any exception (type and first line). Each model
runs in its own ``try``; the JSON and Markdown files are rewritten after each model, so a run cut short leaves what it
finished (the header says ``partial``).

Solves end on CP-SAT's deterministic clock (``--time-limit`` seconds, 0.2 units a second) when
``CKPTPLAN_WALL_SLACK`` stretches the wall-clock backstop (set it to 20, as the tests do), so the plans
do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

import ckptplan  # noqa: E402
from ckptplan.measure import measure_peak  # noqa: E402
from ckptplan.trace import default_loss  # noqa: E402

import hf_zoo  # noqa: E402
from common import describe  # noqa: E402

MIB = 2**20


def error_text(e: BaseException) -> str:
    """``Type: first line`` of an exception."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


class Step:
    """One training step from saved parameters, buffers and RNG seed, so steps can be compared bitwise."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        self.state = copy.deepcopy(model.state_dict())

    def reset(self) -> None:
        self.model.load_state_dict(self.state)
        self.model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)

    def run(self, args: tuple | None = None, kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """Gradients and buffers (``buffer:`` names) after one step; the model reset afterwards."""
        self.reset()
        try:
            default_loss(
                self.model(*(self.args if args is None else args), **(self.kwargs if kwargs is None else kwargs))
            ).backward()
            out = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
            out.update({f"buffer:{n}": b.clone() for n, b in self.model.named_buffers()})
            return out
        finally:
            self.reset()

    def peak(self, args: tuple | None = None, kwargs: dict | None = None) -> int:
        """MemTracker's peak of one step (on other inputs when given); the model reset afterwards."""
        self.reset()
        try:
            return measure_peak(
                self.model, *(self.args if args is None else args), **(self.kwargs if kwargs is None else kwargs)
            )
        finally:
            self.reset()


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bitwise equal (or present on one side only)."""
    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]


def minimum_of(graph: ckptplan.Graph, time_limit: float) -> dict[str, Any]:
    t = time.monotonic()
    try:
        ckptplan.solve(graph, 1, time_limit_s=time_limit)
    except ckptplan.InfeasibleBudget as e:
        return {
            "minimum_bytes": e.minimum_bytes,
            "proven": e.minimum_proven,
            "source": e.minimum_source,
            "solve_s": round(time.monotonic() - t, 1),
        }
    raise AssertionError("a 1-byte budget was not refused")


def run_budget(
    graph: ckptplan.Graph,
    step: Step,
    second: Step,
    ref: dict,
    ref2: dict,
    label: str,
    budget: int,
    minimum: dict | None,
    time_limit: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {"budget": label, "budget_bytes": budget}
    if minimum is not None and minimum["proven"] and budget < minimum["minimum_bytes"]:
        row["error"] = "below the proven minimum (not solved)"
        return row
    t = time.monotonic()
    try:
        plan = ckptplan.solve(graph, budget, time_limit_s=time_limit)
    except Exception as e:  # recorded, the probe goes on
        row.update(solve_s=round(time.monotonic() - t, 1), error=error_text(e))
        if isinstance(e, ckptplan.InfeasibleBudget):
            row["minimum_bytes"] = e.minimum_bytes
        return row
    row.update(
        solve_s=round(time.monotonic() - t, 1),
        status=plan.status,
        gap=plan.gap,
        regions=len(plan.regions),
        predicted_bytes=plan.predicted_peak_bytes,
        remats=sum(1 for r in plan.regions if r.target is not None),
    )
    handle = None
    try:
        handle = ckptplan.apply(step.model, plan)
        row["measured_bytes"] = step.peak()
        row["fits"] = row["measured_bytes"] <= budget
        row["measured_over_predicted"] = round(row["measured_bytes"] / plan.predicted_peak_bytes, 5)
        row["differs"] = differences(step.run(), ref)[:5]
        row["bitwise"] = not row["differs"]
        row["bitwise_new_batch"] = not differences(step.run(second.args, second.kwargs), ref2)
        row["measured_new_batch_bytes"] = step.peak(second.args, second.kwargs)
        row["fits_new_batch"] = row["measured_new_batch_bytes"] <= budget
    except Exception as e:  # recorded, the probe goes on
        row["error"] = error_text(e)
        row["where"] = traceback.extract_tb(e.__traceback__)[-1].name
    finally:
        if handle is not None:
            handle.remove()
        step.reset()
    return row


def probe(name: str, factory: Callable, fractions: list[float], time_limit: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"model": name, "rows": []}
    t = time.monotonic()
    try:
        model, args, kwargs = factory()
        _, args2, kwargs2 = factory(seed=1)
        rec["parameters"] = sum(p.numel() for p in model.parameters())
        rec["frozen"] = [n for n, p in model.named_parameters() if not p.requires_grad]
        step = Step(model, tuple(args), dict(kwargs))
        second = Step(model, tuple(args2), dict(kwargs2))
        graph = ckptplan.trace(model, *args, **kwargs)
        rec["trace_s"] = round(time.monotonic() - t, 1)
        rec["baseline_predicted_bytes"] = graph.baseline_peak_bytes
        ref, ref2 = step.run(), step.run(args2, kwargs2)
        rec["baseline_measured_bytes"] = step.peak()
        minimum = minimum_of(graph, time_limit)
        rec["minimum"] = minimum
        budgets = [(f"{f:.0%}", int(f * graph.baseline_peak_bytes)) for f in fractions]
        budgets.append(("minimum", minimum["minimum_bytes"]))
        for label, budget in budgets:
            rec["rows"].append(run_budget(graph, step, second, ref, ref2, label, budget, minimum, time_limit))
    except Exception as e:  # recorded, the probe goes on
        rec["error"] = error_text(e)
        rec["where"] = traceback.extract_tb(e.__traceback__)[-1].name
    rec["total_s"] = round(time.monotonic() - t, 1)
    return rec


def mib(n: Any) -> str:
    return f"{n / MIB:.3f}" if isinstance(n, int) else "-"


def markdown(header: dict, records: list[dict]) -> str:
    out = [
        "# Real models: trace, solve, apply, step",
        "",
        *(f"Earlier run (its models kept): `{c}`  " for c in header.get("earlier_commands", [])),
        f"Command: `{header['command']}`  ",
        f"Machine: {header['machine']}  ",
        f"Load average at start: {header['load_start']}, at the last write: {header['load_now']}  ",
        (
            f"torch {header['torch']}, transformers {header['transformers']}, solver time limit "
            f"{header['time_limit_s']} s, CKPTPLAN_WALL_SLACK={header['wall_slack']}  "
        ),
        f"State: {header['state']} ({len(records)} of {header['models']} models)",
        "",
        (
            "MiB throughout. *fits*: MemTracker's peak of the planned step <= budget. *bitwise*: gradients and "
            "buffers equal to the unplanned step (same seed); *new batch*: bitwise, and fits, on other inputs."
        ),
        "",
        (
            "| model | budget | budget MiB | status | gap | predicted | measured | meas/pred | fits | bitwise "
            "| new batch | solve s | error |"
        ),
        "|" + "---|" * 13,
    ]
    for rec in records:
        if "error" in rec and not rec["rows"]:
            out.append(
                f"| {rec['model']} | - | - | - | - | - | - | - | - | - | - | - | {rec['error']} "
                f"(in {rec.get('where')}) |"
            )
            continue
        m = rec.get("minimum", {})
        out.append(
            f"| {rec['model']} | none | - | - | - | {mib(rec.get('baseline_predicted_bytes'))} | "
            f"{mib(rec.get('baseline_measured_bytes'))} | "
            + (
                f"{rec['baseline_measured_bytes'] / rec['baseline_predicted_bytes']:.5f}"
                if "baseline_measured_bytes" in rec
                else "-"
            )
            + f" | - | - | - | {m.get('solve_s', '-')} | minimum {mib(m.get('minimum_bytes'))}"
            f"{'' if m.get('proven', True) else ' (upper bound: ' + str(m.get('source')) + ')'} |"
        )
        for r in rec["rows"]:
            err = r.get("error", "")
            if r.get("differs"):
                err = (err + " differs: " + ", ".join(r["differs"])).strip()
            out.append(
                f"| {rec['model']} | {r['budget']} | {mib(r['budget_bytes'])} | {r.get('status', '-')} | "
                f"{r.get('gap', '-')} | {mib(r.get('predicted_bytes'))} | {mib(r.get('measured_bytes'))} | "
                f"{r.get('measured_over_predicted', '-')} | {r.get('fits', '-')} | {r.get('bitwise', '-')} | "
                f"{r.get('bitwise_new_batch', '-')}, {r.get('fits_new_batch', '-')} | "
                f"{r.get('solve_s', '-')} | {err} |"
            )
        if "error" in rec:
            out.append(f"| {rec['model']} | - | - | - | - | - | - | - | - | - | - | - | {rec['error']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/real_models"))
    parser.add_argument("--models", default=",".join(hf_zoo.ZOO), help="comma-separated names of hf_zoo.ZOO")
    parser.add_argument("--budgets", default="0.8,0.6", help="fractions of the no-checkpointing peak")
    parser.add_argument("--time-limit", type=float, default=10.0, help="solver time limit per solve, seconds")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the models of an earlier run's real_models.json in --out and probe the rest",
    )
    ns = parser.parse_args()
    torch.set_num_threads(1)
    import transformers

    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ns.models.split(",")
    header = {
        "command": "CKPTPLAN_WALL_SLACK="
        + os.environ.get("CKPTPLAN_WALL_SLACK", "")
        + " python "
        + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": describe(),
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "time_limit_s": ns.time_limit,
        "wall_slack": os.environ.get("CKPTPLAN_WALL_SLACK"),
        "models": len(names),
    }
    records: list[dict] = []
    path = out / "real_models.json"
    if ns.resume and path.exists():  # same options assumed: the earlier header's command is kept beside
        earlier = json.loads(path.read_text())
        records = [r for r in earlier["models"] if r["model"] in names]
        header["earlier_commands"] = [*earlier["header"].get("earlier_commands", []), earlier["header"]["command"]]
        header["load_start"] = earlier["header"]["load_start"] + " (first run); " + header["load_start"]
    done = {r["model"] for r in records}
    todo = [n for n in names if n not in done]
    for i, name in enumerate(todo):
        print(f"[{time.strftime('%H:%M:%S')}] {name}", file=sys.stderr, flush=True)
        records.append(probe(name, hf_zoo.ZOO[name], [float(f) for f in ns.budgets.split(",")], ns.time_limit))
        header["load_now"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        header["state"] = "complete" if i == len(todo) - 1 else "partial"
        path.write_text(json.dumps({"header": header, "models": records}, indent=1) + "\n")
        (out / "real_models.md").write_text(markdown(header, records))


if __name__ == "__main__":
    main()
