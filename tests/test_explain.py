"""`explain`: what is alive at the peak, by kind and by module, sums to the simulator's peak to the byte."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckptplan.cli import app
from ckptplan.explain import Kind, breakdown, explain, module_rows
from ckptplan.shapes import candidates

from .conftest import solve_at

ROOT = Path(__file__).resolve().parent.parent
GPT2 = f"{ROOT / 'examples' / 'gpt2.py'}:gpt2_tiny"
ARGS = ["-a", "batch_size=4", "-a", "seq_len=64"]


@pytest.mark.parametrize("name", ["gpt2", "resnet", "unet"])
def test_breakdown_sums_to_the_predicted_peak_with_and_without_the_plan(traced, name):
    _, _, graph = traced(name)
    plan = solve_at(graph, 0.6)
    assert plan.regions
    without, planned = explain(graph, plan)
    assert planned is not None
    assert sum(n for _, n in without.by_kind) == without.peak_bytes == plan.baseline_peak_bytes
    assert sum(n for _, n in planned.by_kind) == planned.peak_bytes == plan.predicted_peak_bytes
    for b in (without, planned):
        kinds = dict(b.by_kind)
        assert list(kinds) == list(Kind)
        assert kinds[Kind.PARAMETERS] == graph.param_bytes  # alive throughout the step
        assert sum(n for _, n in b.by_module) == kinds[Kind.ACTIVATIONS]
        assert [t.nbytes for t in b.largest] == sorted((t.nbytes for t in b.largest), reverse=True)
    # the plan frees activations, nothing else
    assert dict(planned.by_kind)[Kind.ACTIVATIONS] < dict(without.by_kind)[Kind.ACTIVATIONS]


def test_module_rows_fold_identical_layers_in_model_order(traced):
    _, _, graph = traced("gpt2")  # 4 blocks: transformer.h.0 .. transformer.h.3
    without = breakdown(graph, candidates(graph), {})
    rows = module_rows(graph, without)
    labels = [r.label for r in rows]
    assert "transformer.h.{0-3}.attn" in labels and not any(".h.0" in label for label in labels)
    assert labels.index("transformer.h.{0-3}.ln_1") < labels.index("transformer.h.{0-3}.mlp.c_fc")
    assert labels.index("transformer.h.{0-3}") < labels.index("transformer.h.{0-3}.ln_1")  # a block, then its parts
    assert sum(r.nbytes[0] for r in rows) == dict(without.by_kind)[Kind.ACTIVATIONS]
    by_block = module_rows(graph, breakdown(graph, candidates(graph), {}, depth=3), depth=3)
    assert [r.label for r in by_block if r.label.startswith("transformer.h")] == ["transformer.h.{0-3}"]


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explain") / "plan.yaml"
    result = CliRunner().invoke(
        app, ["solve", "-m", GPT2, *ARGS, "-b", "70%", "-o", str(out), "--time-limit", "600", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    return out


def test_explain_json_sums_to_the_plans_peaks(plan_file):
    from ckptplan.plan import load_plan

    plan = load_plan(plan_file)
    result = CliRunner().invoke(app, ["explain", str(plan_file), "-m", GPT2, *ARGS, "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert sum(d["plan"]["by_kind"].values()) == d["plan"]["peak_bytes"] == plan.predicted_peak_bytes
    assert (
        sum(d["no_checkpointing"]["by_kind"].values())
        == d["no_checkpointing"]["peak_bytes"]
        == plan.baseline_peak_bytes
    )
    assert sum(d["plan"]["activations_by_module"].values()) == d["plan"]["by_kind"]["activations"]


@pytest.mark.parametrize("width", [80, 100])
def test_explain_fits_the_terminal_and_leads_with_the_answer(plan_file, width):
    result = CliRunner(env={"COLUMNS": str(width)}).invoke(app, ["explain", str(plan_file), "-m", GPT2, *ARGS])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("peak ") and "with the plan" in lines[0]
    assert max(map(len, lines)) <= width
    assert "transformer.h.{0-3}.mlp.c_fc" in result.stderr and "optimizer state" not in result.stderr


def test_explain_with_another_model_exits_5(plan_file):
    result = CliRunner().invoke(app, ["explain", str(plan_file), "-m", GPT2, "-a", "batch_size=2", "-a", "seq_len=64"])
    assert result.exit_code == 5, result.output


def test_trace_breakdown_json_sums_to_the_unplanned_peak():
    result = CliRunner().invoke(app, ["trace", "-m", GPT2, *ARGS, "--optimizer", "adamw", "--breakdown", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    b = d["breakdown"]
    assert sum(b["by_kind"].values()) == b["peak_bytes"] == d["no_checkpointing_peak_bytes"]
    assert b["by_kind"]["optimizer state"] == d["optimizer_state_bytes"] > 0


def test_trace_leads_with_the_peaks():
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["trace", "-m", GPT2, *ARGS])
    assert result.exit_code == 0, result.output
    first = result.stderr.splitlines()[0]
    assert re.match(
        r"peak [\d.]+ [KMG]iB without checkpointing, [\d.]+ [KMG]iB with each block checkpointed "
        r"\(\+[\d.]+% FLOPs\); \d+ candidate regions$",
        first,
    ), first
