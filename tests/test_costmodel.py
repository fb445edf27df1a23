"""The cost model charges what the runtime pays: reruns, each checkpoint call, and selective
checkpointing's dispatch modes only where a region saves an op; the solver and the simulator agree."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ckptplan
import ckptplan.shapes
from ckptplan import costmodel
from ckptplan.solver import cpsat, remat
from ckptplan.solver.regions import candidate_regions
from ckptplan.solver.simulate import simulate

from .test_compare import _Chain


@pytest.mark.parametrize(("ops", "rerun"), [(1, 1), (68, 60), (300, 0)])
def test_on_the_cpu_the_runtime_overheads_add_up(ops, rerun):
    cpu = costmodel.CPU
    plain, selective = cpu.region_ns(num_ops=ops, num_rerun=rerun, device_ns=10**9)  # device time: ignored
    assert plain == cpu.checkpoint_call_ns + ops * cpu.checkpoint_op_ns
    assert selective == cpu.sac_call_ns + ops * cpu.sac_forward_ns + rerun * cpu.sac_replay_ns
    assert cpu.sac_call_ns > 0  # a selective region pays its modes' set-up however few ops it holds


def test_a_rematerialization_pays_its_own_call_and_its_hooks_and_shares_its_mode_and_the_saved_tensor_hook():
    """A recipe's fixed cost is remat_ns, not a checkpoint call's, and its ops' hooks and records
    (remat_op_ns each: recorded in forward, replayed in backward). The recipe mode
    over its module call (remat_visit_ns a forward op of the call) and the saved-tensor hook over every
    tensor the model's forward saves (remat_pack_ns each) are shared costs, keyed so that a plan pays
    each once. Without remat_call_ns a recipe costs a checkpoint call."""
    cpu = costmodel.CPU
    assert cpu.remat_ns == cpu.remat_call_ns != cpu.checkpoint_call_ns
    per_op = cpu.checkpoint_op_ns + cpu.remat_op_ns
    assert cpu.remat_op_ns > 0
    assert cpu.region_ns(num_ops=3, num_rerun=2, device_ns=0, remat=True)[0] == cpu.remat_ns + 3 * per_op
    assert dataclasses.replace(cpu, remat_call_ns=None).remat_ns == cpu.checkpoint_call_ns
    torch.manual_seed(0)
    model, x = _Chain(2, 16), torch.randn(4, 32, 16)
    graph = ckptplan.trace(model, x)
    packs = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(1) or t, lambda t: t):
        model(x)  # the forward alone: the loss's saved tensors are outside the hook's reach
    assert graph.saved_tensors == len(packs) > 0
    remats = [r for r in ckptplan.shapes.candidates(graph) if r.remat]
    assert remats
    for r in remats:
        call = remat.anchor(graph, r.first_op, r.end_op)
        assert r.checkpoint_ns == cpu.remat_ns + (r.end_op - r.first_op) * per_op
        assert dict(r.shared) == {
            f"{remat.SHARED_MODE}{call.path}": (call.end_op - call.first_op) * cpu.remat_visit_ns,
            remat.SHARED_HOOK: len(packs) * cpu.remat_pack_ns,
        }


def test_rematerializations_in_one_module_call_pay_its_mode_and_the_hook_once():
    """Two recipes counted in one module call: the simulator, CP-SAT's evaluation and its objective all
    charge the call's recipe mode and the saved-tensor hook once; a recipe in another call pays its own
    mode, not the hook again."""
    torch.manual_seed(0)
    graph = ckptplan.trace(_Chain(2, 16), torch.randn(4, 32, 16))
    regions = ckptplan.shapes.candidates(graph)
    index = {r.path: j for j, r in enumerate(regions)}
    a, b, other = (regions[index[p]] for p in ("blocks.0.@4", "blocks.0.@7", "blocks.1.@4"))
    mode, hook = dict(a.shared)[f"{remat.SHARED_MODE}blocks.0"], dict(a.shared)[remat.SHARED_HOOK]
    assert mode > 0 and hook > 0 and dict(b.shared)[f"{remat.SHARED_MODE}blocks.0"] == mode
    own = {r.path: r.checkpoint_ns + sum(graph.ops[p].cost_ns for p in r.recipe) for r in (a, b, other)}
    model = cpsat.build(graph, regions, scale_to=graph.baseline_peak_bytes)
    for chosen, shared in ([a], mode + hook), ([a, b], mode + hook), ([a, b, other], 2 * mode + hook):
        expected = sum(own[r.path] for r in chosen) + shared
        assert simulate(graph, regions, {r.path: frozenset() for r in chosen}).extra_cost_ns == expected
        assert model.evaluate({index[r.path]: frozenset() for r in chosen}).cost == expected
    # the objective CP-SAT minimises is the same sum, its shared terms set by the plan
    model.m.add(model.c[index[a.path]] == 1)
    model.m.add(model.c[index[b.path]] == 1)
    model.m.add(sum(model.c) == 2)
    model.m.minimize(model.cost)
    solver = cpsat.cp_model.CpSolver()
    assert solver.solve(model.m) == cpsat.cp_model.OPTIMAL
    assert solver.value(model.cost) == own[a.path] + own[b.path] + mode + hook


def test_on_a_gpu_host_time_hides_behind_long_kernels():
    gpu = costmodel.GPU
    assert gpu.asynchronous and not costmodel.CPU.asynchronous
    sync = dataclasses.replace(gpu, asynchronous=False).region_ns(num_ops=68, num_rerun=60, device_ns=0)
    assert gpu.region_ns(num_ops=68, num_rerun=60, device_ns=0) == sync  # tiny kernels: all exposed
    assert gpu.region_ns(num_ops=68, num_rerun=60, device_ns=10**9) == (0, 0)  # long kernels: all hidden
    # in between, the dispatch modes cost what they make the host exceed the kernels by
    eager = 128 * gpu.op_overhead_ns
    device = eager + sync[0] + sync[1] // 2
    assert gpu.region_ns(num_ops=68, num_rerun=60, device_ns=device) == (0, sync[1] - sync[1] // 2)


def test_a_region_saving_nothing_pays_no_dispatch_modes():
    """Simulator and CP-SAT's evaluate charge the same: reruns and the checkpoint call, plus the dispatch
    modes once the region saves an op."""
    torch.manual_seed(0)
    graph = ckptplan.trace(_Chain(2, 16), torch.randn(4, 32, 16))
    regions = candidate_regions(graph)
    j, r = next((j, r) for j, r in enumerate(regions) if r.path == "blocks.0")
    assert r.choices and r.checkpoint_ns > 0 and r.selective_ns > 0
    reruns = sum(graph.ops[i].cost_ns for i in range(r.first_op, r.recompute_end))
    model = cpsat.build(graph, regions, scale_to=graph.baseline_peak_bytes)

    plain = simulate(graph, regions, {r.path: frozenset()})
    assert plain.extra_cost_ns == reruns + r.checkpoint_ns == model.evaluate({j: frozenset()}).cost
    p = r.choices[0]
    one = simulate(graph, regions, {r.path: frozenset({p})})
    expected = reruns - graph.ops[p].cost_ns + r.checkpoint_ns + r.selective_ns
    assert one.extra_cost_ns == expected == model.evaluate({j: frozenset({p})}).cost


def test_the_solver_caches_nothing_when_dispatch_costs_more_than_it_saves(monkeypatch):
    """With dispatch modes far dearer than any rerun, every plan checkpoints plainly; with them free, the
    same budget's plan caches ops (a tight budget, where recomputing everything is the alternative).
    Checkpoints only: a rematerialization would take the place of a cached op."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 16)

    def plan_with(profile: costmodel.DeviceProfile) -> ckptplan.Plan:
        monkeypatch.setattr(costmodel, "CPU", profile)
        graph = ckptplan.trace(_Chain(4, 16), x)
        with pytest.raises(ckptplan.InfeasibleBudget) as info:
            ckptplan.solve(graph, 1, rematerialize=False)
        budget = (info.value.minimum_bytes + graph.baseline_peak_bytes) // 2
        return ckptplan.solve(graph, budget, gap=0.0, rematerialize=False)

    def saved(plan: ckptplan.Plan) -> int:
        return sum(o.decision.value == "save" for r in plan.regions for o in r.ops)

    free = plan_with(dataclasses.replace(costmodel.CPU, sac_call_ns=0, sac_forward_ns=0, sac_replay_ns=0))
    dear = plan_with(dataclasses.replace(costmodel.CPU, sac_forward_ns=10**9, sac_replay_ns=10**9))
    dear_set_up = plan_with(dataclasses.replace(costmodel.CPU, sac_call_ns=10**9))  # per region, not per op
    assert saved(free) > 0 and saved(dear) == 0 and saved(dear_set_up) == 0
    assert dear.regions and dear_set_up.regions


def test_slow_ops_are_recognised_by_their_traced_names():
    """The traced name of a SLOW_OPS op (namespace, op, overload) is slow; an add and a bare word are not."""
    assert costmodel.is_slow("aten.native_batch_norm.default")
    assert costmodel.is_slow("aten._softmax.default")
    assert not costmodel.is_slow("aten.add.Tensor")
    assert not costmodel.is_slow("native_batch_norm")


def test_an_op_with_a_line_of_its_own_pays_its_fixed_part_its_flops_and_its_traffic():
    """costmodel.OpRate: a CPU convolution is priced by its own line (fixed + FLOPs + traffic, added), so a
    thin one costs far more than its FLOPs at the class's rate; an op without a line keeps its roofline."""
    cpu = costmodel.CPU
    line = cpu.op_rate("convolution")
    assert line is not None and line.fixed_ns > 0 and line.flops_per_s
    flops, moved = 8_400_000, 1_600_000  # the zoo's 2x2 transposed convolution, 8 to 16 channels
    cost = cpu.cost_ns(flops=flops, bytes_moved=moved, is_view=False, op="convolution")
    seconds = line.fixed_ns / 1e9 + flops / line.flops_per_s + moved / line.bytes_per_s
    assert cost == cpu.op_overhead_ns + round(seconds * 1e9)
    roofline = cpu.cost_ns(flops=flops, bytes_moved=moved, is_view=False, op="addmm")
    assert roofline == cpu.op_overhead_ns + round(max(flops / cpu.flops_per_s, moved / cpu.bytes_per_s) * 1e9)
    assert cost > 2 * roofline
    assert cpu.cost_ns(flops=flops, bytes_moved=moved, is_view=True, op="convolution") == cpu.op_overhead_ns
    gelu = cpu.op_rate("gelu")  # a traffic-only line: the same as a roofline at its own rate
    assert gelu is not None and gelu.flops_per_s is None and gelu.fixed_ns == 0
    for f in (0, 10**12):  # a line without a FLOP rate charges no FLOPs
        assert cpu.cost_ns(flops=f, bytes_moved=moved, is_view=False, op="gelu") == cpu.op_overhead_ns + round(
            moved / gelu.bytes_per_s * 1e9
        )
    assert costmodel.GPU.op_rate("convolution") is None
    with pytest.raises(ValueError, match="bytes_per_s must be > 0, got 0"):
        costmodel.OpRate(op="convolution", bytes_per_s=0)
    with pytest.raises(ValueError, match="fixed_ns must be >= 0"):
        costmodel.OpRate(op="convolution", bytes_per_s=1e9, fixed_ns=-1)
    with pytest.raises(ValueError, match="without namespace and overload"):
        costmodel.OpRate(op="aten.convolution.default", bytes_per_s=1e9)  # would never match a traced op
    with pytest.raises(ValueError, match="more than one rate"):
        dataclasses.replace(cpu, op_rates=(*cpu.op_rates, costmodel.OpRate(op="gelu", bytes_per_s=1e9)))


def test_a_traced_convolution_is_priced_by_its_line():
    """The tracer prices each op with its aten name: a CPU convolution's and a training BatchNorm's
    estimates are their own lines', a matmul's and a LayerNorm's their class's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.Flatten(),
        torch.nn.LayerNorm(8 * 16 * 16),
        torch.nn.Linear(8 * 16 * 16, 4),
    )
    graph = ckptplan.trace(model, torch.randn(2, 8, 16, 16))
    cpu = costmodel.CPU

    def op(name: str):
        return next(o for o in graph.ops if o.name.split(".")[1] == name)

    conv, bn, ln, mm = op("convolution"), op("native_batch_norm"), op("native_layer_norm"), op("addmm")
    assert conv.cost_ns == cpu.cost_ns(flops=conv.flops, bytes_moved=conv.bytes_moved, is_view=False, op="convolution")
    assert conv.cost_ns >= cpu.op_overhead_ns + cpu.op_rate("convolution").fixed_ns
    assert bn.cost_ns == cpu.op_overhead_ns + round(bn.bytes_moved / cpu.op_rate("native_batch_norm").bytes_per_s * 1e9)
    assert ln.cost_ns == cpu.op_overhead_ns + round(ln.bytes_moved / cpu.slow_bytes_per_s * 1e9)
    assert cpu.op_rate("native_batch_norm").bytes_per_s != cpu.slow_bytes_per_s
    assert mm.cost_ns == cpu.cost_ns(flops=mm.flops, bytes_moved=mm.bytes_moved, is_view=False, op="addmm")
