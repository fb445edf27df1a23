"""Plan files: YAML round trip, determinism, the header, folding of identical layers, atomic save,
and refusal of hand edits that break the file."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import ckptplan
from ckptplan.errors import InputError
from ckptplan.graph import Forced
from ckptplan.objective import Objective
from ckptplan.plan import Decision, PlanStatus, expand_paths, fold_paths, load_plan


def _gpt2_tiny():
    import gpt2  # examples/, on sys.path via conftest.py

    return gpt2.gpt2_tiny(batch_size=4, seq_len=64)


@pytest.fixture(scope="module")
def graph():
    model, args = _gpt2_tiny()
    return ckptplan.trace(model, *args)


@pytest.fixture(scope="module")
def budget(graph) -> int:
    """The minimum budget: the plan then checkpoints several identical blocks, and solves fast."""
    with pytest.raises(ckptplan.InfeasibleBudget) as info:
        ckptplan.solve(graph, 1)
    return info.value.minimum_bytes


@pytest.fixture(scope="module")
def plan(graph, budget):
    """By FLOPs: it caches the ops that cost no memory at the minimum, so the file has both decisions (the
    time objective does not: each block would pay selective checkpointing's dispatch modes)."""
    return ckptplan.solve(graph, budget, objective="flops")


@pytest.fixture
def saved(plan, tmp_path) -> Path:
    return plan.save(tmp_path / "plan.yaml")


# ---- round trip ------------------------------------------------------------------------------------
NOT_WRITTEN = {"solve_time_s"}  # kept out of the file so identical solves give identical files
ROUNDED = {"extra_cost_ns"}  # written as estimated_recompute_ms with 3 decimals


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def test_yaml_round_trip_field_by_field(plan, saved):
    loaded = load_plan(saved)
    assert plan.regions and plan.status in ("optimal", "feasible")
    for f in dataclasses.fields(plan):
        if f.name in NOT_WRITTEN | ROUNDED | {"regions"}:
            continue
        assert getattr(loaded, f.name) == getattr(plan, f.name), f.name
    assert loaded.solver_stats == plan.solver_stats  # compare=False in the dataclass, but written
    assert abs(loaded.extra_cost_ns - plan.extra_cost_ns) <= 500
    # regions, by path (their order is test_round_trip_keeps_forward_order_of_regions's business):
    # type, restored buffers and every op row: op, module, shapes, dtype, bytes, decision, FLOPs, forced-by
    assert len(loaded.regions) == len(plan.regions)
    assert {r.path: r for r in loaded.regions} == {r.path: r for r in plan.regions}
    assert {o.decision for r in loaded.regions for o in r.ops} == {Decision.SAVE, Decision.RECOMPUTE}
    assert saved.read_text(encoding="utf-8") == plan.to_yaml()


def test_choices_are_enums_written_and_formatted_as_their_values(plan, saved):
    """Status, objective and each op's forced-by are enums; in the file, in f-strings and compared, each is
    its value, as the plain strings they replaced were (on Python 3.11+ a plain str Enum formats as its
    name)."""
    loaded = load_plan(saved)
    assert isinstance(loaded.status, PlanStatus) and loaded.objective is Objective.FLOPS
    assert f"{loaded.objective}" == "flops" and f"{loaded.status}" == str(loaded.status) == loaded.status.value
    text = saved.read_text(encoding="utf-8")
    assert "\n  objective: flops  #" in text and f"\n  status: {loaded.status.value}\n" in text
    forced = [o.forced for r in loaded.regions for o in r.ops if o.forced is not None]
    assert forced and all(isinstance(f, Forced) for f in forced)
    built = dataclasses.replace(plan, status="feasible", objective="time")  # strings, as older callers pass
    assert built.status is PlanStatus.FEASIBLE and built.objective is Objective.TIME


def test_yaml_round_trip_is_exact_for_regions_in_path_order(plan, tmp_path):
    """With regions already in the order the loader sorts them to, the round trip is exact."""
    ordered = plan.with_regions(tuple(sorted(plan.regions, key=lambda r: _natural(r.path))))
    path = ordered.save(tmp_path / "ordered.yaml")
    loaded = load_plan(path)
    assert (
        dataclasses.replace(loaded, solve_time_s=ordered.solve_time_s, extra_cost_ns=ordered.extra_cost_ns) == ordered
    )
    assert loaded.to_yaml() == path.read_text(encoding="utf-8")  # byte-identical when written again


def test_round_trip_keeps_forward_order_of_regions(plan, saved):
    loaded = load_plan(saved)
    assert [r.path for r in loaded.regions] == [r.path for r in plan.regions]
    assert loaded.to_yaml() == saved.read_text(encoding="utf-8")


# ---- determinism -----------------------------------------------------------------------------------
def test_same_graph_solved_again_gives_identical_yaml(graph, budget, plan):
    assert ckptplan.solve(graph, budget, objective="flops").to_yaml() == plan.to_yaml()


def test_traced_again_and_solved_gives_identical_yaml(graph, budget, plan):
    model, args = _gpt2_tiny()
    again = ckptplan.trace(model, *args)
    assert again.fingerprint == graph.fingerprint
    assert ckptplan.solve(again, budget, objective="flops").to_yaml() == plan.to_yaml()


# ---- the file's layout -----------------------------------------------------------------------------
def test_header_comes_before_regions(plan, graph):
    text = plan.to_yaml()
    assert text.startswith(f"# ckptplan plan for {plan.model}: peak ")
    head, _, body = text.partition("\nregions:")
    assert body and "- modules:" not in head
    for line in [
        "schema: 1",
        f'fingerprint: "{graph.fingerprint}"',
        "budget:",
        f"  bytes: {plan.budget_bytes}",
        "peak:",
        f"  no_checkpointing: {plan.baseline_peak_bytes}",
        f"  full_checkpointing: {plan.full_peak_bytes}",
        f"  plan: {plan.predicted_peak_bytes}",
        "flops:",
        f"  forward: {plan.forward_flops}",
        f"  extra_forward: {plan.extra_forward_flops}",
        "solver:",
        f"  status: {plan.status}",
    ]:
        assert re.search(rf"^{re.escape(line)}(\s+#.*)?$", head, re.M), line
    assert plan.predicted_peak_bytes <= plan.budget_bytes


def test_identical_layers_are_folded(plan):
    text = plan.to_yaml()
    blocks = text.count("\n  - modules:")
    counts = [int(c) for c in re.findall(r"^    count: (\d+)$", text, re.M)]
    assert len(counts) == blocks
    assert 0 < blocks < len(plan.regions)
    assert sum(counts) == len(plan.regions) and max(counts) > 1
    listed = [p for m in re.findall(r"^  - modules: \"(.*)\"$", text, re.M) for p in expand_paths(m)]
    assert sorted(listed) == sorted(r.path for r in plan.regions)


_name = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True)
_prefix = st.lists(_name, min_size=1, max_size=4).map(".".join)


@given(_prefix, st.lists(st.integers(0, 500), min_size=1, max_size=20, unique=True).map(sorted))
def test_fold_then_expand_numbered_layers(prefix, numbers):
    paths = [f"{prefix}.{n}" for n in numbers]
    folded = fold_paths(paths)
    assert expand_paths(folded) == paths
    if len(paths) > 1:
        assert folded.startswith(prefix + ".{") and len(folded) < len(",".join(paths)) + 2


def test_fold_paths_example():
    assert fold_paths(["a.b.3", "a.b.4", "a.b.7"]) == "a.b.{3-4,7}"
    assert expand_paths("a.b.{3-4,7}") == ["a.b.3", "a.b.4", "a.b.7"]


@given(st.lists(st.lists(_name, min_size=1, max_size=4).map(".".join), min_size=1, max_size=8, unique=True))
def test_fold_then_expand_other_names(paths):
    assert expand_paths(fold_paths(paths)) == paths


# ---- atomic save -----------------------------------------------------------------------------------
def test_save_over_an_existing_file_leaves_no_temporary_files(plan, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("old contents\n")
    plan.save(path)
    plan.save(path)
    assert os.listdir(tmp_path) == ["plan.yaml"]
    assert path.read_text(encoding="utf-8") == plan.to_yaml()


def test_failed_save_leaves_the_original_unchanged(plan, saved, monkeypatch):
    before = saved.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        dataclasses.replace(plan, budget_text="something else").save(saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


# ---- hand edits ------------------------------------------------------------------------------------
def _edit(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, count), encoding="utf-8")


def test_changed_schema_is_refused(saved):
    _edit(saved, "\nschema: 1\n", "\nschema: 2\n")
    with pytest.raises(InputError, match="schema") as info:
        load_plan(saved)
    assert str(saved) in str(info.value) and "ckptplan solve" in str(info.value)


def test_bad_decision_in_an_op_row_is_refused(saved):
    _edit(saved, '"recompute", ', '"maybe", ')
    with pytest.raises(InputError, match="maybe") as info:
        load_plan(saved)
    assert str(saved) in str(info.value)


@pytest.mark.parametrize(
    "line", ["model:", "fingerprint:", "signature:", "inputs:", "  plan:", "  forward:", "  status:", "    type:"]
)
def test_missing_key_is_refused_naming_the_file(saved, line):
    text = saved.read_text(encoding="utf-8")
    kept = [ln for ln in text.splitlines(keepends=True) if not ln.startswith(line)]
    assert len(kept) < len(text.splitlines())
    saved.write_text("".join(kept), encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_plan(saved)
    assert str(saved) in str(info.value)
    assert line.strip().rstrip(":") in str(info.value)  # the KeyError names the key


@pytest.mark.parametrize(
    "old, new, field",
    [
        ("  status: optimal", "  status: done", "status"),
        ("\n  bytes: ", "\n  bytes: -", "budget_bytes"),
    ],
)
def test_invalid_values_are_refused(saved, plan, old, new, field):
    if old.strip() == "status: optimal" and plan.status != "optimal":
        old = f"  status: {plan.status}"
    _edit(saved, old, new)
    with pytest.raises(InputError, match=field):
        load_plan(saved)


def test_invalid_value_error_names_the_file(saved):
    _edit(saved, "\n  bytes: ", "\n  bytes: -")
    with pytest.raises(InputError) as info:
        load_plan(saved)
    assert str(saved) in str(info.value)


@pytest.mark.parametrize("cut", ["last op row", "last region block"])
def test_plan_cut_at_a_line_boundary_is_refused(saved, cut):
    lines = saved.read_text(encoding="utf-8").splitlines(keepends=True)
    if cut == "last op row":
        lines = lines[:-1]
    else:
        lines = lines[: max(i for i, ln in enumerate(lines) if ln.startswith("  - modules:"))]
    saved.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(InputError):
        load_plan(saved)
