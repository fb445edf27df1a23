"""The CLI through typer's CliRunner: exit codes, messages on stderr, JSON on stdout, files at -o.

One small model (gpt2_tiny, batch 4, sequence 64) is solved a few times per module: plans near its
minimum budget solve in well under a second, where mid-range budgets take CP-SAT several seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckptplan.cli import app
from ckptplan.plan import fold_paths, fold_regions, load_plan
from ckptplan.units import format_bytes, parse_budget

ROOT = Path(__file__).resolve().parent.parent
GPT2 = f"{ROOT / 'examples' / 'gpt2.py'}:gpt2_tiny"
LLAMA = f"{ROOT / 'examples' / 'llama.py'}:llama_tiny"
ARGS = ["-a", "batch_size=4", "-a", "seq_len=64"]

# Wide enough that rich never wraps a message or truncates a table cell under the runner.
runner = CliRunner(env={"COLUMNS": "300"})


def run(*args: str):
    """Invoke the CLI; any exception other than a deliberate exit is a bug, and so is a traceback."""
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def flat(text: str) -> str:
    return " ".join(text.split())


# ---- fixtures: a few plans solved once per module -------------------------------------------------
@pytest.fixture(scope="module")
def plans_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plans")


@pytest.fixture(scope="module")
def infeasible_json(plans_dir):
    out = plans_dir / "never-json.yaml"
    result = run("solve", "-m", GPT2, *ARGS, "-b", "1MB", "-o", str(out), "--json")
    return result, out


@pytest.fixture(scope="module")
def minimum_bytes(infeasible_json) -> int:
    result, _ = infeasible_json
    assert result.exit_code == 3, result.output
    return json.loads(result.stdout)["minimum_bytes"]


@pytest.fixture(scope="module")
def infeasible_human(plans_dir):
    out = plans_dir / "never.yaml"
    return run("solve", "-m", GPT2, *ARGS, "-b", "1MB", "-o", str(out)), out


def _solve(plans_dir: Path, name: str, budget: int, *extra: str):
    out = plans_dir / f"{name}.yaml"
    # a wall-clock limit no busy machine reaches: the plan is the one CP-SAT's deterministic clock gives
    result = run("solve", "-m", GPT2, *ARGS, "-b", str(budget), "-o", str(out), "--json", "--time-limit", "600", *extra)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def plan_min(plans_dir, minimum_bytes):
    """A plan at exactly the minimum that exit 3 reported: it must be feasible."""
    return _solve(plans_dir, "at-minimum", minimum_bytes)


@pytest.fixture(scope="module")
def plan_min_flops(plans_dir, minimum_bytes):
    """At the minimum, by FLOPs: it caches the ops that cost no memory (the time objective does not, as
    each block would pay selective checkpointing's dispatch modes), so it has both decisions."""
    return _solve(plans_dir, "at-minimum-flops", minimum_bytes, "--objective", "flops")


@pytest.fixture(scope="module")
def plan_roomy(plans_dir, minimum_bytes):
    """Enough room above the minimum that the plan keeps more (at 4% it could be the minimum's plan)."""
    return _solve(plans_dir, "roomy", minimum_bytes * 115 // 100)


# ---- solve ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["plan_min", "plan_roomy"])
def test_solve_writes_the_plan_and_prints_json(request, which):
    path, payload = request.getfixturevalue(which)
    assert path.is_file()
    assert payload["plan_file"] == str(path)
    assert payload["status"] in ("optimal", "feasible")
    assert 0 < payload["predicted_peak_bytes"] <= payload["budget_bytes"]
    assert payload["model"] == "gpt2_tiny"
    plan = load_plan(path)  # the file holds the plan the JSON describes
    assert plan.predicted_peak_bytes == payload["predicted_peak_bytes"]
    assert sorted(r.path for r in plan.regions) == sorted(payload["checkpointed_regions"] + payload["rematerialized"])
    assert all(not r.remat for r in plan.regions if r.path in payload["checkpointed_regions"])


def test_solve_human_output_goes_to_stderr(plans_dir, minimum_bytes):
    out = plans_dir / "human.yaml"
    result = run("solve", "-m", GPT2, *ARGS, "-b", str(minimum_bytes), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "gpt2_tiny" in result.stderr and str(out) in result.stderr
    assert out.is_file()


def test_out_of_range_gap_or_reserve_exits_2_before_tracing(tmp_path):
    for option, message in (
        (["--gap", "1.5"], "gap must be a fraction in [0, 1)"),
        (["--reserve", "-0.1"], "reserve must be a fraction in [0, 0.5)"),
    ):
        out = tmp_path / "plan.yaml"
        result = run("solve", "-m", "no/such/file.py:factory", "-b", "8GB", *option, "-o", str(out))
        assert result.exit_code == 2  # the spec would fail to load: the range check came first
        assert message in flat(result.stderr) and option[1] in flat(result.stderr)
        assert not out.exists()


@pytest.mark.parametrize(
    "budget, hint",
    [
        ("8Gb", "gigabits"),  # bits, not bytes
        ("abc", "accepted forms"),
        ("0.5", "ambiguous"),  # a bare decimal has no unit
    ],
)
def test_unparseable_budget_exits_2_with_a_hint(tmp_path, budget, hint):
    out = tmp_path / "plan.yaml"
    result = run("solve", "-m", GPT2, *ARGS, "-b", budget, "-o", str(out))
    assert result.exit_code == 2
    msg = flat(result.stderr)
    assert repr(budget) in msg and hint in msg
    assert not out.exists()


def test_infeasible_budget_exits_3_naming_the_minimum_and_a_command(infeasible_human, minimum_bytes):
    result, out = infeasible_human
    assert result.exit_code == 3
    msg = flat(result.stderr)
    assert f"minimum feasible budget: {format_bytes(minimum_bytes)}" in msg
    m = re.search(r"ckptplan solve --budget (\S+)", msg)
    assert m, msg
    assert parse_budget(m.group(1)) >= minimum_bytes  # the suggested budget is enough
    assert f"--model {GPT2}" in msg
    assert not out.exists()


def test_infeasible_suggestion_keeps_the_factory_arguments(infeasible_human):
    result, _ = infeasible_human
    command = re.search(r"ckptplan solve --budget .*", flat(result.stderr)).group(0)
    assert "batch_size=4" in command and "seq_len=64" in command


def test_infeasible_budget_json_payload(infeasible_json, minimum_bytes):
    result, out = infeasible_json
    payload = json.loads(result.stdout)  # stdout holds the JSON object and nothing else
    assert payload["exit_code"] == 3 and payload["error"] == "InfeasibleBudget"
    assert isinstance(payload["minimum_bytes"], int) and payload["minimum_bytes"] > 10**6
    assert format_bytes(minimum_bytes) in payload["message"]
    assert not out.exists()


# ---- model specs -----------------------------------------------------------------------------------
def _solve_spec(tmp_path: Path, spec: str):
    out = tmp_path / "plan.yaml"
    result = run("solve", "-m", spec, "-b", "80%", "-o", str(out))
    assert not out.exists()
    return result.exit_code, flat(result.stderr)


def test_missing_model_file_exits_2(tmp_path):
    missing = tmp_path / "nope.py"
    code, msg = _solve_spec(tmp_path, f"{missing}:factory")
    assert code == 2
    assert str(missing) in msg and "does not exist" in msg


def test_missing_factory_exits_2_listing_callables(tmp_path):
    code, msg = _solve_spec(tmp_path, f"{ROOT / 'examples' / 'gpt2.py'}:gpt3_tiny")
    assert code == 2
    assert "'gpt3_tiny'" in msg
    assert "gpt2_tiny" in msg and "gpt2_small" in msg  # what the file does offer


def test_factory_that_raises_exits_2_with_its_message(tmp_path):
    (tmp_path / "bad.py").write_text("def boom(**kwargs):\n    raise ValueError('n_head must divide 7')\n")
    code, msg = _solve_spec(tmp_path, f"{tmp_path / 'bad.py'}:boom")
    assert code == 2
    assert "boom" in msg and "ValueError" in msg and "n_head must divide 7" in msg


def test_factory_returning_the_wrong_thing_exits_2(tmp_path):
    (tmp_path / "answer.py").write_text("def answer(**kwargs):\n    return 42\n")
    code, msg = _solve_spec(tmp_path, f"{tmp_path / 'answer.py'}:answer")
    assert code == 2
    assert "(model, args)" in msg and "int" in msg


# ---- verify ----------------------------------------------------------------------------------------
def test_verify_matching_model_fits_and_measures_the_predicted_flops(plan_min):
    path, payload = plan_min
    result = run("verify", str(path), "-m", GPT2, *ARGS, "--json")
    assert result.exit_code == 0, result.output
    v = json.loads(result.stdout)
    assert v["fits"] is True
    assert 0 < v["measured_peak_bytes"] <= v["budget_bytes"] == payload["budget_bytes"]
    assert v["measured_extra_forward_flops"] == v["predicted_extra_forward_flops"] > 0
    # step time against the unplanned model: present and positive (no timing assertion)
    assert v["steps_timed"] == 3 and v["step_ns_without_plan"] > 0 and v["step_ns_with_plan"] > 0
    assert isinstance(v["measured_step_time_percent"], float) and v["estimated_step_time_percent"] > 0


def test_verify_human_output_reports_step_time(plan_min):
    path, _ = plan_min
    result = run("verify", str(path), "-m", GPT2, *ARGS, "--steps", "1")
    assert result.exit_code == 0, result.output
    text = flat(result.stderr)
    assert re.search(
        r"step time: [\d.]+ [mµ]?s without the plan, [\d.]+ [mµ]?s with it: [+-][\d.]+% "
        r"\(median of 1 steps each; estimated \+[\d.]+%\)",
        text,
    ), text
    no_timing = json.loads(run("verify", str(path), "-m", GPT2, *ARGS, "--steps", "0", "--json").stdout)
    assert no_timing["step_ns_without_plan"] is None and no_timing["fits"] is True
    assert run("verify", str(path), "-m", GPT2, *ARGS, "--steps", "-1").exit_code == 2


def test_verify_against_another_model_exits_5(plan_min):
    path, _ = plan_min
    result = run("verify", str(path), "-m", LLAMA)
    assert result.exit_code == 5
    assert "gpt2_tiny" in flat(result.stderr)  # says which model the plan was made for


def test_verify_with_another_batch_size_exits_5_naming_the_shape(plan_min):
    path, _ = plan_min
    result = run("verify", str(path), "-m", GPT2, "-a", "batch_size=2", "-a", "seq_len=64", "--json")
    assert result.exit_code == 5
    payload = json.loads(result.stdout)
    assert payload["error"] == "PlanMismatch" and payload["exit_code"] == 5
    assert "int64[2, 64]" in payload["message"] and "int64[4, 64]" in payload["message"]


# ---- show ------------------------------------------------------------------------------------------
def _first_row_index(output: str, title: str) -> int:
    """The '#' cell of the first op row of the group whose table has this title."""
    lines = output.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip() == title)
    row = next(ln for ln in lines[at + 1 :] if ln.startswith("│"))
    return int(row.split("│")[1])


def _title(paths: list[str], r) -> str:
    return f"{fold_paths(paths)} ({'remat' if r.remat else r.type_name} x{len(paths)})"


def test_show_leads_with_the_answer_and_lists_ops_on_request(plan_min_flops):
    path, payload = plan_min_flops
    result = run("show", str(path))
    assert result.exit_code == 0, result.output
    out = result.stderr  # rich output goes to stderr; stdout is for --json
    assert result.stdout == ""
    saved = payload["no_checkpointing_peak_bytes"] - payload["predicted_peak_bytes"]
    assert flat(out).startswith(f"saves {format_bytes(saved)}: peak {format_bytes(payload['predicted_peak_bytes'])}")
    assert "gpt2_tiny" in out and "est. recompute" in out and "decision" not in out  # no op rows
    with_ops = run("show", str(path), "--ops").stderr
    assert "recompute" in with_ops and "save" in with_ops
    # identical layers share one group, labelled with all their paths and the count
    groups = fold_regions(load_plan(path).regions)
    folded = [(paths, r) for paths, r in groups if len(paths) > 1]
    assert folded, "the plan at the minimum checkpoints identical layers"
    for paths, r in folded:
        assert fold_paths(paths) in out
        assert _title(paths, r) in with_ops
    assert re.search(r"transformer\.h\.\S* \(\w+ x[2-9]\)", with_ops)


@pytest.mark.parametrize("sort, key", [("order", None), ("bytes", "nbytes"), ("flops", "recompute_flops")])
def test_show_sorts_rows_inside_each_group(plan_min, sort, key):
    path, _ = plan_min
    result = run("show", str(path), "--ops", "--sort", sort)
    assert result.exit_code == 0, result.output
    for paths, r in fold_regions(load_plan(path).regions):
        values = [getattr(o, key) for o in r.ops] if key else None
        # stable sort, largest first: the first row is the first op with the largest value
        want = values.index(max(values)) if key else 0
        assert _first_row_index(result.stderr, _title(paths, r)) == want


@pytest.mark.parametrize("width", [80, 100])
def test_show_and_diff_fit_the_terminal(plan_min, plan_roomy, width):
    narrow = CliRunner(env={"COLUMNS": str(width)})
    for args in (["show", str(plan_min[0]), "--ops"], ["diff", str(plan_roomy[0]), str(plan_min[0]), "--ops"]):
        result = narrow.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert max(map(len, result.stderr.splitlines())) <= width, args
        assert "…" not in result.stderr  # nothing cut: long names wrap


def test_show_with_the_model_says_it_resimulated(plan_min):
    path, payload = plan_min
    result = run("show", str(path), "-m", GPT2, *ARGS)
    assert result.exit_code == 0, result.output
    assert f"re-simulated on gpt2_tiny as traced now: peak {format_bytes(payload['predicted_peak_bytes'])}" in flat(
        result.stderr
    )


def test_show_unknown_sort_exits_2(plan_min):
    path, _ = plan_min
    result = run("show", str(path), "--sort", "nonsense")
    assert result.exit_code == 2
    assert "order, bytes or flops" in result.output


@pytest.mark.parametrize(
    "content",
    [
        None,  # missing file
        "half",  # truncated in the middle of a line
        "schema99",
        "::: [",  # not YAML
        "- just\n- a list\n",  # YAML, but not a mapping
    ],
)
def test_show_bad_plan_file_exits_2_naming_it(tmp_path, plan_min, content):
    good, _ = plan_min
    bad = tmp_path / "bad.yaml"
    text = good.read_text()
    if content == "half":
        bad.write_text(text[: len(text) // 2])
    elif content == "schema99":
        bad.write_text(text.replace("\nschema: 1\n", "\nschema: 99\n"))
    elif content is not None:
        bad.write_text(content)
    for extra in ([], ["--json"]):
        result = run("show", str(bad), *extra)
        assert result.exit_code == 2
        assert str(bad) in flat(result.stderr)
    assert json.loads(result.stdout)["error"] == "InputError"


# ---- diff ------------------------------------------------------------------------------------------
def test_diff_of_two_budgets(plan_min, plan_roomy):
    (a, pa), (b, pb) = plan_roomy, plan_min
    result = run("diff", str(a), str(b), "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["same_model"] is True
    assert d["header"]["budget_bytes"] == [pa["budget_bytes"], pb["budget_bytes"]]
    assert d["header"]["predicted_peak_bytes"] == [pa["predicted_peak_bytes"], pb["predicted_peak_bytes"]]
    assert d["ops_changed"] or d["regions_added"] or d["regions_removed"]
    decided = {k: set(p["checkpointed_regions"] + p["rematerialized"]) for k, p in (("a", pa), ("b", pb))}
    assert set(d["regions_added"]) == decided["b"] - decided["a"]
    assert set(d["regions_removed"]) == decided["a"] - decided["b"]

    human = run("diff", str(a), str(b))
    assert human.exit_code == 0
    text = flat(human.stderr)
    assert f"peak, this plan │ {format_bytes(pa['predicted_peak_bytes'])}" in text
    assert "est. recompute" in text and "_ns" not in text and "_bytes" not in text
    if d["ops_changed"]:
        assert f"op decisions changed │ │ {len(d['ops_changed'])} (--ops lists them)" in text


def test_diff_of_a_plan_with_itself_is_empty(plan_min):
    path, _ = plan_min
    d = json.loads(run("diff", str(path), str(path), "--json").stdout)
    assert d == {"same_model": True, "header": {}, "regions_added": [], "regions_removed": [], "ops_changed": []}


def test_diff_with_a_missing_plan_exits_2(tmp_path, plan_min):
    path, _ = plan_min
    result = run("diff", str(path), str(tmp_path / "gone.yaml"))
    assert result.exit_code == 2
    assert str(tmp_path / "gone.yaml") in flat(result.stderr)


# ---- trace -----------------------------------------------------------------------------------------
def test_trace_json():
    result = run("trace", "-m", GPT2, *ARGS, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model"] == "gpt2_tiny"
    assert info["forward_ops"] > 0 and info["candidate_regions"] > 0
    assert info["no_checkpointing_peak_bytes"] > info["full_checkpointing_peak_bytes"] > info["parameter_bytes"]
    assert info["inputs"] == ["int64[4, 64]", "int64[4, 64]"]


# ---- a budget above the unplanned peak ----------------------------------------------------------------
def test_budget_above_the_peak_says_it_fits_without_checkpointing(tmp_path):
    out = tmp_path / "roomy.yaml"
    result = run("solve", "-m", GPT2, *ARGS, "-b", "1TiB", "-o", str(out))
    assert result.exit_code == 0, result.output
    plan = load_plan(out)
    assert plan.regions == ()
    text = flat(result.stderr)
    assert (
        f"fits without checkpointing: the peak without checkpointing, {format_bytes(plan.baseline_peak_bytes)}, "
        f"is within the budget 1.00 TiB; the plan {out} checkpoints nothing"
    ) in text
    as_json = run("solve", "-m", GPT2, *ARGS, "-b", "1TiB", "-o", str(out), "--json")
    assert json.loads(as_json.stdout)["fits_without_checkpointing"] is True


# ---- sweep, for humans ------------------------------------------------------------------------------
def test_sweep_leads_with_the_answer_and_fits_80_columns():
    result = CliRunner(env={"COLUMNS": "80"}).invoke(
        app, ["sweep", "-m", GPT2, *ARGS, "--budgets", "65%", "--time-limit", "600"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert max(map(len, lines)) <= 80
    first = flat(result.stderr)
    assert re.match(
        r"65% = [\d.]+ [KMG]iB: ckptplan peak [\d.]+ [KMG]iB, est\. recompute [\d.]+ [mµ]?s, "
        r"\+[\d.]+% FLOPs; cheapest other policy: ",
        first,
    ), first
    assert "…" not in result.stderr
