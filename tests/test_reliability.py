"""A plan never lies and never corrupts training: real model features, other paths, compile, bad plans."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from typer.testing import CliRunner

import ckptplan
from ckptplan.cli import app
from ckptplan.plan import Decision
from ckptplan.solver import cpsat
from ckptplan.units import parse_budget

from .conftest import MODELS, ROOT, assert_same, grads_after


# ---- a model with the awkward features ---------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc, self.proj, self.drop = nn.Linear(d, 2 * d), nn.Linear(d, d), nn.Dropout(0.1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # mutated in forward

    def forward(self, x: torch.Tensor, *, gate: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # a recomputation must not count twice
        a, b = self.fc(x).chunk(2, dim=-1)  # split: two views of one output
        h = a * torch.sigmoid(b)
        h.relu_()  # in-place on a fresh tensor
        h = self.proj(self.drop(h.view(x.shape)))
        h = h * gate
        h += x  # in-place on a fresh tensor
        return h


class Awkward(nn.Module):
    """Keyword-only input, shared submodule called twice, unbind, a tied weight, dict/tuple outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(Block(32) for _ in range(4))
        self.shared = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, *, gate: torch.Tensor) -> dict:
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, gate=gate)
        h = self.shared(torch.tanh(self.shared(h)))
        rows = h.unbind(1)
        logits = F.linear(torch.stack(rows, 1), self.inp.weight.t())  # the input weight, tied
        return {"logits": logits, "aux": (h.mean(), rows[0].sum())}


def awkward_loss(out: dict) -> torch.Tensor:
    return out["logits"].pow(2).mean() + out["aux"][0] + 0.1 * out["aux"][1]


def test_awkward_model_features_keep_gradients_bitwise():
    torch.manual_seed(0)
    model, x, gate = Awkward(), torch.randn(64, 8, 16), torch.rand(32)
    graph = ckptplan.trace(model, x, gate=gate, loss_fn=awkward_loss)
    try:
        plan = ckptplan.solve(graph, "50%")
    except ckptplan.InfeasibleBudget as e:
        plan = ckptplan.solve(graph, e.minimum_bytes)
    paths = [r.path for r in plan.regions]
    assert paths and not any(p.startswith("shared") for p in paths)  # called twice: never a region
    calls = [b.calls.item() for b in model.blocks]
    reference = grads_after(model, lambda: awkward_loss(model(x, gate=gate)))
    assert [b.calls.item() for b in model.blocks] == [c + 1 for c in calls]
    with ckptplan.apply(model, plan) as handle:
        got = grads_after(model, lambda: awkward_loss(model(x, gate=gate)))
        assert handle.stats.extra_forward_flops == plan.extra_forward_flops
    assert_same(reference, got)
    assert [b.calls.item() for b in model.blocks] == [c + 2 for c in calls]  # once per step, not per rerun
    assert any("calls" in r.mutated_buffers for r in plan.regions)
    forced = {o.forced for r in plan.regions for o in r.ops}
    assert {"view", "inplace", "random"} <= forced


def test_autocast_bf16_on_cpu():
    """Each step in its own autocast context, as PyTorch recommends (its weight-cast cache is per context)."""
    model, args = MODELS["llama"]()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(*args)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        graph = ckptplan.trace(model, *args)
    assert any(t.dtype == "bfloat16" for op in graph.ops for t in op.outputs)
    plan = ckptplan.solve(graph, "60%")
    reference = grads_after(model, step)
    with ckptplan.apply(model, plan) as handle:
        got = grads_after(model, step)
        assert handle.stats.extra_forward_flops == plan.extra_forward_flops
    assert_same(reference, got)


class Routed(nn.Module):
    """Data-dependent routing: which Linear runs depends on the sign of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return torch.relu(self.up(x)) + x
        return torch.tanh(self.down(x)) + x


def solve_at_minimum(graph, *, rematerialize: bool = True) -> ckptplan.Plan:
    with pytest.raises(ckptplan.InfeasibleBudget) as info:
        ckptplan.solve(graph, 1, rematerialize=rematerialize)
    return ckptplan.solve(graph, info.value.minimum_bytes, rematerialize=rematerialize)


def routed_at_minimum(*, rematerialize: bool = True) -> tuple[nn.Module, torch.Tensor, ckptplan.Plan]:
    """Four routed blocks traced on a positive input, and their plan at the minimum budget."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Routed() for _ in range(4)])
    pos = torch.rand(256, 16) + 0.5
    return model, pos, solve_at_minimum(ckptplan.trace(model, pos), rematerialize=rematerialize)


def test_other_path_raises_before_any_gradient():
    model, pos, plan = routed_at_minimum()
    assert plan.regions
    with ckptplan.apply(model, plan):
        model.zero_grad(set_to_none=True)
        with pytest.raises(ckptplan.PlanMismatch) as err:
            model(-pos).sum().backward()
    msg = str(err.value)
    assert re.search(r"op #\d+", msg) and "down" in msg and "up" in msg  # names what ran and what was planned
    assert all(p.grad is None for p in model.parameters())


def test_a_region_saving_nothing_is_checked_at_its_first_step_then_runs_plain():
    """A region that saves nothing runs as plain torch.utils.checkpoint once its first step has checked its
    ops: another path later cannot change its gradients (it recomputes everything), only its memory.
    ``strict=True`` checks it at every step, before any gradient. (Checkpoints only: a rematerialization
    records its recipe, so it is checked at every step.)"""
    model, pos, plan = routed_at_minimum(rematerialize=False)
    assert plan.regions and all(o.decision is Decision.RECOMPUTE for r in plan.regions for o in r.ops)

    def grads(x: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    other = grads(-pos)  # no plan: the other branch's gradients
    with ckptplan.apply(model, plan, strict=True):
        grads(pos)
        model.zero_grad(set_to_none=True)
        with pytest.raises(ckptplan.PlanMismatch, match="down"):
            model(-pos).sum().backward()
        assert all(p.grad is None for p in model.parameters())
    with ckptplan.apply(model, plan) as handle:
        grads(pos)
        assert handle.stats.extra_forward_flops == plan.extra_forward_flops
        assert_same(other, grads(-pos))  # checked at the first step only: plain checkpoint, same gradients


class CachedBlock(nn.Module):
    """Appends its input to a per-step cache and attends over the cache, as a KV cache does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, cache: list) -> torch.Tensor:
        cache.append(x)
        keys = torch.cat(cache) if len(cache) > 1 else cache[0]  # a recomputation sees the cache grown
        return torch.tanh(self.fc(x)) * keys.mean() + x


class CachedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CachedBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, [])  # a fresh cache per block and per step, mutated by the block's forward
        return x.sum()


def test_recomputation_that_runs_other_ops_raises_plan_mismatch():
    """State the forward changed (a KV cache) makes the rerun differ: say so, never SAC's opaque error."""
    torch.manual_seed(0)
    model = CachedModel()
    x = torch.randn(512, 16)
    plan = solve_at_minimum(ckptplan.trace(model, x))
    assert any(r.path.startswith("blocks.") for r in plan.regions)
    with ckptplan.apply(model, plan):
        with pytest.raises(ckptplan.PlanMismatch, match=r"recomputing it in backward ran aten\.cat"):
            model(x).backward()


def test_a_model_returning_a_kv_cache_is_refused_at_trace():
    class Out(dict):
        __getattr__ = dict.get

    class WithCache(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            return Out(loss=h.sum(), past_key_values=[h.detach()])

    with pytest.raises(ckptplan.InputError, match="use_cache=False"):
        ckptplan.trace(WithCache(), torch.randn(2, 4))


@pytest.mark.parametrize("name", ["gpt2", "resnet"])
def test_torch_compile_with_a_plan(name):
    """Compiled with and without a plan of checkpoints: same gradients, same BatchNorm statistics. A plan
    that rematerializes refuses to run compiled (the compiled graph's ops are not the traced step's),
    before any gradient, and says how to solve for a compiled model."""
    model, args = MODELS[name]()
    graph = ckptplan.trace(model, *args)
    remat = ckptplan.solve(graph, "70%")
    assert any(r.remat for r in remat.regions)
    torch._dynamo.reset()
    with ckptplan.apply(model, remat), pytest.raises(ckptplan.PlanMismatch, match="--no-remat"):
        model.zero_grad(set_to_none=True)
        torch.compile(model, backend="aot_eager")(*args)
    assert all(p.grad is None for p in model.parameters())
    plan = ckptplan.solve(graph, "70%", rematerialize=False)
    state = copy.deepcopy(model.state_dict())

    def step():
        model.load_state_dict(state)
        return torch.compile(model, backend="aot_eager")(*args)

    torch._dynamo.reset()
    reference = grads_after(model, step)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    torch._dynamo.reset()
    with ckptplan.apply(model, plan) as handle:
        got = grads_after(model, step)
        assert handle.stats.extra_forward_flops == plan.extra_forward_flops
    torch._dynamo.reset()
    assert_same(reference, got)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    model.load_state_dict(state)


# ---- bad plans and solver limits through the CLI ---------------------------------------------------------
GPT2 = str(ROOT / "examples" / "gpt2.py") + ":gpt2_tiny"
ARGS = ["-m", GPT2, "-a", "batch_size=8", "-a", "seq_len=128"]


def run(*argv: str):
    return CliRunner().invoke(app, list(argv), env={"COLUMNS": "300"})


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "p.yaml"
    result = run("solve", "-b", "60%", *ARGS, "-o", str(path), "-q")
    assert result.exit_code == 0, result.output
    return path


def edit_rows(text: str, pick, new: str, limit: int) -> str:
    out, n = [], 0
    for line in text.splitlines():
        if n < limit and pick(line):
            line, n = line.replace('"recompute"', f'"{new}"'), n + 1
        out.append(line)
    assert n, "nothing to edit"
    return "\n".join(out) + "\n"


def test_hand_edit_that_no_longer_fits_is_caught_with_the_overshoot(plan_file, tmp_path):
    edited = tmp_path / "edited.yaml"
    edited.write_text(
        edit_rows(plan_file.read_text(), lambda row: '"recompute"' in row and row.endswith("null]"), "save", 40)
    )
    for command in ("verify", "show"):
        result = run(command, str(edited), *ARGS)
        assert result.exit_code == 2, result.output
        msg = " ".join(result.stderr.split())
        assert "no longer fit" in msg and re.search(r"by [\d.]+ \w+B", msg)
    assert run("show", str(plan_file), *ARGS).exit_code == 0  # the unedited plan passes the same check


def test_hand_edit_saving_a_forced_op_is_refused(plan_file, tmp_path):
    edited = tmp_path / "forced.yaml"
    edited.write_text(edit_rows(plan_file.read_text(), lambda row: '"random"]' in row, "save", 1))
    result = run("verify", str(edited), *ARGS)
    assert result.exit_code == 2, result.output
    assert "cannot be saved (random)" in " ".join(result.stderr.split())


def test_time_limit_with_no_plan_exits_4(monkeypatch, tmp_path):
    real = cpsat._Model.solve

    def never(self, **kwargs):
        sol = real(self, **kwargs)
        return cpsat.Solution(
            status=cpsat.Status.UNKNOWN,
            saved={},
            objective_ns=0,
            bound_ns=0,
            wall_s=sol.wall_s,
            deterministic_s=sol.deterministic_s,
            num_variables=0,
            num_constraints=0,
        )

    monkeypatch.setattr(cpsat._Model, "solve", never)
    out = tmp_path / "p.yaml"
    result = run("solve", "-b", "30%", *ARGS, "--reserve", "0", "-o", str(out))  # below full checkpointing
    assert result.exit_code == 4, result.output
    assert "--time-limit" in " ".join(result.stderr.split())
    assert not out.exists()


# ---- budget strings through the CLI, and Ctrl-C -------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=12),
        st.from_regex(r"[ -]?[0-9]{0,4}(\.[0-9]{0,3})?[ ]?(|[kKmMgGtT]i?[bB]?|%|bit|[eE][0-9])", fullmatch=True),
    )
)
def test_any_budget_string_gets_exit_2_and_a_message_never_a_traceback(text):
    """Valid budgets go on to load the (missing) model; invalid ones stop at the budget. Both exit 2."""
    result = run("solve", "-b", text, "-m", "no/such/model.py:factory", "-q")
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    msg = " ".join(result.stderr.split())
    try:
        parse_budget(text, reference_bytes=2**50)
    except ckptplan.BudgetError as e:
        assert " ".join(str(e).split()) in msg
    else:
        assert "no/such/model.py does not exist" in msg


def test_ctrl_c_writes_the_best_plan_or_nothing(tmp_path):
    """SIGINT mid-solve: CP-SAT stops and the best plan so far is written whole, or nothing is."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    out = tmp_path / "plan.yaml"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ckptplan.cli",
            "solve",
            "-m",
            "examples/gpt2.py:gpt2_xl",
            "-b",
            "85%",
            "--gap",
            "0",
            "--time-limit",
            "60",
            "-o",
            str(out),
            "-q",
            "--target",
            "cpu",
        ],  # a CPU step: its attention matrices leave much to plan
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Python's default SIGINT handler would end the imports with a traceback: wait until the solve command
    # runs (it loads OR-Tools before the trace, ~8 s, and the search), however long a busy machine takes
    maps = Path(f"/proc/{proc.pid}/maps")
    while proc.poll() is None and "ortools" not in maps.read_text(errors="replace"):
        time.sleep(0.5)
    time.sleep(12)  # most often in CP-SAT's search by now, at gap 0 until the limit; either outcome is checked
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr
    assert proc.returncode in (0, 130), stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != "plan.yaml"] == []  # no temporary left
    if proc.returncode == 0:
        plan = ckptplan.load_plan(out)
        assert plan.predicted_peak_bytes <= plan.budget_bytes
    else:
        assert not out.exists() and "interrupted" in stderr


@pytest.mark.parametrize("content", [None, "half", "schema99", "::: ["])
def test_verify_on_a_bad_plan_file_exits_2_naming_it(plan_file, tmp_path, content):
    bad = tmp_path / "bad.yaml"
    text = plan_file.read_text()
    if content == "half":
        bad.write_text(text[: len(text) // 2])
    elif content == "schema99":
        bad.write_text(text.replace("\nschema: 1\n", "\nschema: 99\n"))
    elif content is not None:
        bad.write_text(content)
    result = run("verify", str(bad), *ARGS)
    assert result.exit_code == 2, result.output
    assert str(bad) in " ".join(result.stderr.split())


def test_time_limit_with_a_plan_reports_feasible_and_its_gap():
    sys.path.insert(0, str(ROOT / "examples"))
    from ckptplan.solver.regions import candidate_regions, outermost
    from ckptplan.solver.simulate import simulate

    import llama

    # meta, 32 layers, 5% of the way from full checkpointing to none: several memory rows bind there and
    # proving optimality (gap 0) takes far longer than 6 s (docs/benchmarks.md, "Planning a 7B model")
    model, args = llama.llama_7b()
    graph = ckptplan.trace(model, *args, target="cpu")  # the math attention's matrices: many rows bind
    regions = candidate_regions(graph)
    full = simulate(graph, regions, {r.path: frozenset() for r in outermost(regions)}).peak_bytes
    budget = full + (graph.baseline_peak_bytes - full) // 20
    plan = ckptplan.solve(graph, budget, time_limit_s=6, gap=0)
    # the limit stops the search before optimality is proven; which clock runs out first depends on the
    # machine's speed: the deterministic one after a bound is proven (gap ~0.1%), the wall clock on a slow or
    # loaded machine sometimes before CP-SAT proves any (gap 1: nothing proven). Either is reported as such.
    assert plan.status == "feasible" and 0 < plan.gap <= 1
    assert plan.predicted_peak_bytes <= plan.budget_bytes
