"""ckptplan.fit and `ckptplan fit`: the largest batch size or sequence length whose step fits a budget."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ckptplan
from ckptplan import fit as fit_module
from ckptplan.cli import app
from ckptplan.errors import InfeasibleBudget, InputError
from ckptplan.fit import Trial, fit
from ckptplan.plan import load_plan
from ckptplan.units import format_bytes

from .fit_models import stack

ROOT = Path(__file__).resolve().parent.parent
STACK = f"{ROOT / 'tests' / 'fit_models.py'}:stack"
LIMIT = 10.0  # seconds per solve: the tiny stack solves to optimality far inside the deterministic limit
runner = CliRunner(env={"COLUMNS": "300"})


def build(**fixed):
    def traced(value: int):
        model, args = stack(**{**fixed, "batch_size": value})
        return ckptplan.trace(model, *args)

    return traced


def run(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def flat(text: str) -> str:
    return " ".join(text.split())


# ---- the search, on an oracle: fits iff value <= k ------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 13, 100, 1000])
def test_search_finds_the_largest_value_in_logarithmic_trials(monkeypatch, k):
    def oracle(graph, value, budget_bytes, **_):
        return Trial(
            value=value,
            no_checkpointing_peak_bytes=1,
            minimum_bytes=1,
            minimum_proven=True,
            forward_cost_ns=1,
            plan=object() if value <= k else None,
        )  # type: ignore[arg-type]

    monkeypatch.setattr(fit_module, "_try", oracle)
    result = fit(lambda value: None, "1GB", limit=4096)  # type: ignore[arg-type,return-value]
    values = [t.value for t in result.trials]
    assert result.best.value == k and not result.at_limit
    assert len(set(values)) == len(values)  # never the same value twice
    assert len(values) <= 2 * math.ceil(math.log2(k + 1)) + 1
    doubling = values[: values.index(2 ** math.ceil(math.log2(k + 1))) + 1]
    assert doubling == [2**i for i in range(len(doubling))]  # exponential first, then bisection


@pytest.mark.parametrize(
    ("k", "start", "limit", "multiple", "best", "at_limit"),
    [
        (100, 1, 40, 1, 40, True),  # everything fits up to the limit
        (70, 16, 1000, 16, 64, False),  # multiples of 16 only, from 16
        (70, 10, 1000, 16, 64, False),  # start rounds up to a multiple
    ],
)
def test_search_bounds(monkeypatch, k, start, limit, multiple, best, at_limit):
    def oracle(graph, value, budget_bytes, **_):
        return Trial(
            value=value,
            no_checkpointing_peak_bytes=1,
            minimum_bytes=1,
            minimum_proven=True,
            forward_cost_ns=1,
            plan=object() if value <= k else None,
        )  # type: ignore[arg-type]

    monkeypatch.setattr(fit_module, "_try", oracle)
    result = fit(
        lambda value: None,
        "1GB",
        start=start,
        limit=limit,  # type: ignore[arg-type,return-value]
        multiple_of=multiple,
    )
    assert (result.best.value, result.at_limit) == (best, at_limit)
    assert all(t.value % multiple == 0 and start <= t.value <= limit for t in result.trials)


@pytest.mark.parametrize("budget", ["50%", "-1GB", "8Gb"])
def test_relative_or_bad_budgets_are_refused_before_any_trace(budget):
    def never(value):
        raise AssertionError("traced")

    with pytest.raises((InputError, ckptplan.BudgetError)):
        fit(never, budget)


# ---- the search on a real model -------------------------------------------------------------------
def test_largest_batch_on_the_tiny_stack_is_the_last_that_solves():
    budget = 2**20
    traced = build()
    result = fit(traced, budget, time_limit_s=LIMIT)
    best = result.best.value
    assert best > 1 and not result.at_limit
    assert result.best.plan.predicted_peak_bytes <= budget
    # independently of the search: the planner fits the answer, and not one more
    direct = ckptplan.solve(traced(best), budget, time_limit_s=LIMIT)
    assert [r.path for r in direct.regions] == [r.path for r in result.best.plan.regions]
    assert direct.extra_cost_ns == result.best.plan.extra_cost_ns
    with pytest.raises(InfeasibleBudget):
        ckptplan.solve(traced(best + 1), budget, time_limit_s=LIMIT)
    for trial in result.trials:  # each value's minimum budget decides whether it fits
        assert trial.minimum_proven and trial.fits == (trial.minimum_bytes <= budget)
    assert [t.value for t in result.trials][:4] == [1, 2, 4, 8]


def test_nothing_fits_names_the_minimum_at_the_start():
    with pytest.raises(
        InfeasibleBudget,
        match=r"nothing fits budget 100\.00 KiB: even at batch_size=1, the "
        r"minimum is .* KiB; try --budget",
    ) as e:
        fit(build(), "100KiB", time_limit_s=LIMIT)
    assert e.value.minimum_bytes > 100 * 1024 and e.value.minimum_proven


# ---- the CLI --------------------------------------------------------------------------------------
def test_cli_writes_the_plan_of_the_largest_batch(tmp_path):
    out = tmp_path / "fit.yaml"
    result = run("fit", "-m", STACK, "--vary", "batch_size", "-b", "1MiB", "-o", str(out), "--time-limit", str(LIMIT))
    assert result.exit_code == 0, result.output
    plan = load_plan(out)
    best = plan.inputs[0].split("[")[1].split(",")[0]  # float32[B, T, W]
    text = flat(result.stderr)
    assert f"largest batch_size that fits 1.00 MiB: {best} (peak {format_bytes(plan.predicted_peak_bytes)}," in text
    assert f"plan written to {out}" in text
    assert re.search(r"% forward FLOPs; checkpoints (blocks\.\{[\d,-]+\}|blocks\.\d+|nothing)", text), text
    assert "values of batch_size tried, budget 1.00 MiB" in text
    rows = [line.split("│")[1:-1] for line in result.stderr.splitlines() if line.startswith("│")]
    values = [int(r[0]) for r in rows]
    assert values == sorted(values) and int(best) in values
    fits = {int(r[0]): r[3].strip() for r in rows}
    assert fits[int(best)] == "yes" and fits[max(values)] == "no"


def test_cli_json_varies_seq_len_up_to_the_limit(tmp_path):
    out = tmp_path / "seq.yaml"
    result = run(
        "fit",
        "-m",
        STACK,
        "--vary",
        "seq_len",
        "--start",
        "16",
        "--max",
        "64",
        "--multiple-of",
        "16",
        "-b",
        "1MiB",
        "-o",
        str(out),
        "--time-limit",
        str(LIMIT),
        "--json",
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert (d["argument"], d["best"], d["at_limit"], d["plan_file"]) == ("seq_len", 64, True, str(out))
    assert [t["value"] for t in d["trials"]] == [16, 32, 64] and all(t["fits"] for t in d["trials"])
    assert load_plan(out).inputs == ("float32[2, 64, 32]",)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--vary", "batchsize", "-b", "1MiB"],
            2,
            "the factory stack takes no argument 'batchsize'; it takes: batch_size, seq_len, width, depth, seed",
        ),
        (["--vary", "batch_size", "-b", "50%"], 2, "budget '50%' is a percentage of the unplanned peak"),
        (["--vary", "batch_size", "-b", "1MiB", "-a", "batch_size=4"], 2, "--vary batch_size sets batch_size; drop -a"),
        (["--vary", "batch size", "-b", "1MiB"], 2, "--vary 'batch size' must name a factory argument"),
        (
            ["--vary", "batch_size", "-b", "100KiB"],
            3,
            "nothing fits budget 100.00 KiB: even at batch_size=1, the minimum",
        ),
    ],
)
def test_cli_errors(args, code, message):
    result = run("fit", "-m", STACK, *args, "--time-limit", str(LIMIT))
    assert result.exit_code == code, result.output
    assert message in flat(result.stderr)
