"""Rematerialization: tensors dropped after forward and rebuilt at their first unpack (solver/remat.py,
rematerialize.py), checked against real steps."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import ckptplan
from ckptplan.decisions import plan_decisions
from ckptplan.graph import Forced, parse_path
from ckptplan.measure import measure_peak
from ckptplan.plan import load_plan
from ckptplan.shapes import candidates
from ckptplan.solver.regions import candidate_regions
from ckptplan.solver.remat import remat_candidates
from ckptplan.solver.simulate import simulate

from .conftest import MODELS


def grads_and_buffers(model: nn.Module, args: tuple) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    out = model(*args)
    (out if out.dim() == 0 else out.sum()).backward()
    return (
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        {n: b.clone() for n, b in model.named_buffers()},
    )


class ConvBlock(nn.Module):
    """conv -> BatchNorm -> in-place ReLU, then a conv on a transposed view of that output, BatchNorm and an
    out-of-place ReLU: the tensors eager autograd keeps between modules."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.b(self.a(x).transpose(2, 3))  # the conv saves a view of the ReLU's output
        return torch.relu(self.bn(z)).pow(2).mean()


@pytest.fixture()
def conv_block():
    torch.manual_seed(0)
    return ConvBlock(), (torch.randn(4, 3, 16, 16),)


def test_candidates_are_batchnorm_relu_outputs_rebuilt_from_the_convolution(conv_block):
    model, args = conv_block
    graph = ckptplan.trace(model, *args)
    found = {r.path: r for r in remat_candidates(graph, candidate_regions(graph))}
    ops = {p: [graph.ops[i].name for i in r.ops] for p, r in found.items()}
    # in place: BatchNorm's output is the ReLU's, one storage; the recipe reads the conv output BatchNorm saves
    assert ops["a.@3"] == ["aten.native_batch_norm.default", "aten.relu_.default"]
    conv_out = graph.ops[found["a.@3"].first_op].inputs[0]
    assert graph.ops[graph.storages[conv_out].producer].name == "aten.convolution.default"
    assert conv_out in found["a.@3"].input_storages
    # out of place: the ReLU's recipe grows back over BatchNorm, whose output nobody saves
    assert any(o[-2:] == ["aten.native_batch_norm.default", "aten.relu.default"] for o in ops.values())
    assert parse_path("a.@3") == ("a", 3) and parse_path("a.@0.~1@4:1") == ("", 4)
    assert parse_path("a.1.@0.~1@3") == ("a", 3) and parse_path("a.1.@0.~0@3") == ("a.1", 3)
    assert parse_path("@7") == ("", 7) and parse_path("@7:1") == ("", 7)


def test_plan_with_remats_gives_bitwise_gradients_and_fits_measured(conv_block):
    model, args = conv_block
    state = copy.deepcopy(model.state_dict())
    graph = ckptplan.trace(model, *args)
    plan = ckptplan.solve(graph, "90%", objective="flops")
    assert "a.@3" in {r.path for r in plan.regions} and plan.extra_forward_flops == 0
    reference = grads_and_buffers(model, args)
    model.load_state_dict(state)
    with ckptplan.apply(model, plan) as handle:
        got = grads_and_buffers(model, args)
        assert handle.stats.recomputed_regions >= sum(r.remat for r in plan.regions)
        model.load_state_dict(state)
        peak = measure_peak(model, *args)
    for a, b in zip(reference, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # grads, BatchNorm statistics
    assert peak <= plan.budget_bytes
    without = measure_peak(model, *args)
    assert peak < without


@pytest.mark.parametrize("name", ["resnet", "unet"])
def test_zoo_remat_plans_fit_and_match(name):
    model, args = MODELS[name]()
    state = copy.deepcopy(model.state_dict())
    graph = ckptplan.trace(model, *args)
    plan = ckptplan.solve(graph, "70%", objective="flops")
    checkpoints_only = ckptplan.solve(graph, "70%", objective="flops", rematerialize=False)
    assert any(r.remat for r in plan.regions)
    assert plan.extra_forward_flops < checkpoints_only.extra_forward_flops  # what rematerializing buys
    reference = grads_and_buffers(model, args)
    model.load_state_dict(state)
    with ckptplan.apply(model, plan) as handle:
        got = grads_and_buffers(model, args)
        assert handle.stats.extra_forward_flops == plan.extra_forward_flops
        model.load_state_dict(state)
        peak = measure_peak(model, *args)
    model.load_state_dict(state)
    for a, b in zip(reference, got):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert peak <= plan.predicted_peak_bytes <= plan.budget_bytes


def test_no_recipe_draws_random_numbers(traced):
    _, _, graph = traced("gpt2")  # dropout everywhere
    remats = [r for r in candidates(graph) if r.remat]
    assert remats and not any(graph.ops[i].random for r in remats for i in r.recipe)


def test_a_longer_recipe_and_the_shorter_one_never_both(traced):
    _, _, graph = traced("unet")
    regions = candidates(graph)
    chained = [r for r in regions if r.remat and ".~" in r.path]
    assert chained
    short = max((r for r in regions if chained[0].path.startswith(r.path + ".")), key=lambda r: len(r.path))
    assert short.remat and short.target == chained[0].target
    with pytest.raises(ValueError, match="nest"):
        simulate(graph, regions, {short.path: frozenset(), chained[0].path: frozenset()})


def test_plan_file_round_trip_and_a_wrong_target_is_refused(conv_block, tmp_path):
    model, args = conv_block
    graph = ckptplan.trace(model, *args)
    plan = ckptplan.solve(graph, "90%", objective="flops")
    path = plan.save(tmp_path / "p.yaml")
    again = load_plan(path)
    assert again == plan and 'type: "rematerialize"' in path.read_text()
    assert plan_decisions(graph, again)[1] == plan_decisions(graph, plan)[1]
    text = path.read_text().replace("target: [0, 0]", "target: [0, 1]", 1)
    assert text != path.read_text()
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ckptplan.InputError, match="rebuilds output"):
        ckptplan.check_plan(graph, load_plan(tmp_path / "bad.yaml"))


class KeywordBlocks(nn.Module):
    """Blocks called with their input by keyword, as Hugging Face layers take hidden_states=."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(32) for _ in range(2))
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(input=norm(x))
        return x.pow(2).mean()


def test_a_keyword_input_is_held_by_the_checkpoint_of_its_module():
    """torch's checkpoint keeps its keyword tensor arguments alive: the trace records them as the call's
    inputs, so a plan that checkpoints the block and rematerializes its input fits as measured."""
    torch.manual_seed(0)
    model, x = KeywordBlocks(), torch.randn(64, 16, 32)
    graph = ckptplan.trace(model, x)
    norm = graph.module_call("norms.0")
    norm_out = graph.ops[norm.end_op - 1].allocates[0]
    assert norm_out in graph.module_call("blocks.0").input_storages
    assert any(r.remat and r.target == norm_out for r in candidates(graph))
    # the block checkpointed and its keyword input rematerialized: the checkpoint keeps the input anyway
    remat = next(
        r
        for b in ("95%", "85%", "75%")
        for r in ckptplan.solve(graph, b, objective="flops").regions
        if r.remat and r.path.startswith("norms.1")
    )
    block = next(
        r
        for b in ("80%", "70%", "60%")
        for r in ckptplan.solve(graph, b, rematerialize=False).regions
        if r.path == "blocks.1"
    )
    plan = dataclasses.replace(ckptplan.solve(graph, "85%"), regions=(remat, block))
    regions, saved = plan_decisions(graph, plan)
    predicted = simulate(graph, regions, saved).peak_bytes
    with ckptplan.apply(model, plan):
        peak = measure_peak(model, x)
    assert peak <= predicted


def test_higher_order_gradients_are_refused(conv_block):
    model, args = conv_block
    graph = ckptplan.trace(model, *args)
    plan = ckptplan.solve(graph, "90%", objective="flops")
    assert any(r.remat for r in plan.regions)
    with ckptplan.apply(model, plan):
        loss = model(*args)
        with pytest.raises(ckptplan.PlanMismatch, match="create_graph"):
            torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


def only(graph, path: str, budgets: tuple[str, ...]) -> ckptplan.Plan:
    """The first FLOPs-optimal plan at ``budgets`` that rematerializes ``path``, with only that decision."""
    plan = next(
        p for p in (ckptplan.solve(graph, b, objective="flops") for b in budgets) if path in {r.path for r in p.regions}
    )
    return dataclasses.replace(plan, regions=tuple(r for r in plan.regions if r.path == path))


def rebuilt_once_bitwise(model: nn.Module, state: dict, x: torch.Tensor, plan: ckptplan.Plan) -> int:
    """Applies ``plan`` (one rematerialization of 0 FLOPs): gradients and BatchNorm statistics bitwise
    those of the plain step, one rebuild counted; returns the measured peak."""
    reference = grads_and_buffers(model, (x,))
    model.load_state_dict(state)
    with ckptplan.apply(model, plan) as handle:
        got = grads_and_buffers(model, (x,))
        assert handle.stats.recomputed_regions == 1 and handle.stats.extra_forward_flops == 0
        model.load_state_dict(state)
        peak = measure_peak(model, x)
    for a, b in zip(reference, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return peak


class Downsample(nn.Module):
    """A ResNet block that changes width: its output is ReLU(BN(conv2) + BN(shortcut conv)). The shortcut
    convolution runs between the two BatchNorms, and its output is kept anyway (its BatchNorm saves it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return self.head(torch.relu_(out)).pow(2).mean()


def test_a_recipe_reads_a_kept_convolution_instead_of_rerunning_it(tmp_path):
    torch.manual_seed(0)
    model, x = Downsample(), torch.randn(8, 4, 16, 16)
    state = copy.deepcopy(model.state_dict())
    graph = ckptplan.trace(model, x)
    out = next(
        r
        for r in candidates(graph)
        if r.remat and graph.ops[graph.storages[r.target].producer].name == "aten.add.Tensor"
    )
    kept = [graph.ops[i].name for i in out.kept]
    assert kept == ["aten.convolution.default"]  # the shortcut conv: read, not rerun
    assert graph.ops[out.kept[0]].module == "shortcut.0" and out.first_op < out.kept[0]
    assert not any(graph.ops[i].flops for i in out.recipe)
    assert dict(out.forced)[out.kept[0]] is Forced.KEPT
    conv_out = graph.ops[out.kept[0]].allocates[0]
    assert conv_out in out.input_storages
    # a plan that rematerializes it: the file lists the kept op as saved, and reads back the same
    plan = only(graph, out.path, ("90%", "85%", "80%", "75%", "70%"))
    row = plan.regions[0].ops[out.kept[0] - out.first_op]
    assert row.decision is ckptplan.Decision.SAVE and row.forced == "kept" and row.recompute_flops == 0
    again = load_plan(plan.save(tmp_path / "p.yaml"))
    assert plan_decisions(graph, again)[1] == plan_decisions(graph, plan)[1] == {out.path: frozenset()}
    regions, saved = plan_decisions(graph, plan)
    predicted = simulate(graph, regions, saved)
    assert rebuilt_once_bitwise(model, state, x, plan) <= predicted.peak_bytes
    # setting the kept op to recompute is refused: the recipe never reruns it
    text = (tmp_path / "p.yaml").read_text()
    bad = text.replace('"save", 0, 0, "kept"', '"recompute", 0, 0, "kept"', 1)
    assert bad != text
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(ckptplan.InputError, match="is kept"):
        load_plan(tmp_path / "bad.yaml")  # refused on load, without a trace
    i = out.kept[0] - out.first_op
    ops = list(plan.regions[0].ops)
    ops[i] = dataclasses.replace(ops[i], decision=ckptplan.Decision.RECOMPUTE)
    edited = plan.with_regions((dataclasses.replace(plan.regions[0], ops=tuple(ops)),))  # edited in memory
    with pytest.raises(ckptplan.InputError, match="is kept"):
        ckptplan.check_plan(graph, edited)
    with pytest.raises(ckptplan.InputError, match="saves exactly its ops marked 'kept'"):
        ckptplan.apply(model, edited)  # refused before any step, without a trace


class UpCat(nn.Module):
    """A U-Net level: a transposed conv, concatenated with the skip tensor, then a conv. Nobody saves the
    transposed conv's output (its backward needs its input), so rebuilding the concatenation would rerun
    it; the holding recipe keeps that half instead."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        low = nn.functional.max_pool2d(skip, 2)
        return self.conv(torch.cat([skip, self.up(low)], dim=1)).pow(2).mean()


def test_a_holding_recipe_keeps_the_costly_half_of_a_concatenation():
    torch.manual_seed(0)
    model, x = UpCat(), torch.randn(8, 3, 32, 32)
    state = copy.deepcopy(model.state_dict())
    graph = ckptplan.trace(model, x)
    cats = [
        r
        for r in candidates(graph)
        if r.remat and graph.ops[graph.storages[r.target].producer].name == "aten.cat.default"
    ]
    held = next(r for r in cats if [graph.ops[i].name for i in r.recipe] == ["aten.cat.default"])
    others = [r for r in cats if r is not held]
    assert others and all(any(graph.ops[i].flops for i in r.recipe) for r in others)  # rerun the transposed conv
    assert all(held.path.startswith(r.path + ".") and held.target == r.target for r in others)  # one at most
    up_out = next(
        s
        for s in graph.ops[held.first_op].inputs
        if graph.storages[s].producer is not None
        and graph.ops[graph.storages[s].producer].name == "aten.convolution.default"
    )
    assert not graph.storages[up_out].saved_by and up_out in held.input_storages
    regions = candidates(graph)
    saved = {held.path: frozenset()}
    predicted = simulate(graph, regions, saved)
    without = simulate(graph, regions, {})
    assert predicted.extra_forward_flops == 0 and predicted.peak_bytes < without.peak_bytes
    plan = only(graph, held.path, ("95%", "90%", "85%", "80%"))
    assert rebuilt_once_bitwise(model, state, x, plan) <= predicted.peak_bytes


def test_a_mismatch_in_an_eager_model_does_not_blame_torch_compile(conv_block):
    """Issue 34: a recipe that runs other ops than its plan named torch.compile although nothing was compiled."""
    model, args = conv_block
    torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2))  # something else in the process is compiled
    plan = ckptplan.solve(ckptplan.trace(model, *args), "90%", objective="flops")
    region = next(r for r in plan.regions if r.remat)
    edited = dataclasses.replace(
        region, ops=(dataclasses.replace(region.ops[0], op="aten.sin.default"), *region.ops[1:])
    )
    plan = dataclasses.replace(plan, regions=tuple(edited if r is region else r for r in plan.regions))
    with ckptplan.apply(model, plan), pytest.raises(ckptplan.PlanMismatch, match="another path") as info:
        model(*args).backward()
    assert "compile" not in str(info.value)


class Encoder(nn.Module):
    """A stock nn.TransformerEncoder (post-norm, dropout on, batch_first): each layer calls its self-attention
    as ``self_attn(x, x, x)``, and nn.MultiheadAttention projects q, k and v at once only when ``query is
    key is value``."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=256, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).square().mean()


def minimum_plan(graph: ckptplan.Graph, *, rematerialize: bool = True) -> ckptplan.Plan:
    with pytest.raises(ckptplan.InfeasibleBudget) as info:
        ckptplan.solve(graph, 1, rematerialize=rematerialize)
    return ckptplan.solve(graph, info.value.minimum_bytes, rematerialize=rematerialize)


def seeded_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the same dropout masks in both steps
    return grads_and_buffers(model, (x,))[0]


def test_self_attention_of_one_tensor_recomputes_the_same_ops_beside_rematerializations():
    """Rematerializations' saved-tensor hooks make each unpacked checkpoint input a new object: the second
    layer's self-attention (its input has a history) recomputed with ``query is not key`` and projected q,
    k and v one by one, other ops than its forward (PlanMismatch in backward). The checkpoint now takes
    the tensor once (NOTE [ One tensor passed twice ])."""
    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(4, 16, 32)
    state = copy.deepcopy(model.state_dict())
    plan = minimum_plan(ckptplan.trace(model, x))
    paths = {r.path for r in plan.regions}
    assert "encoder.layers.1.self_attn" in paths and any(r.remat for r in plan.regions)
    reference = seeded_grads(model, x)
    model.load_state_dict(state)
    with ckptplan.apply(model, plan) as handle:
        got = seeded_grads(model, x)
        assert handle.stats.recomputed_regions >= len(paths)
    assert reference.keys() == got.keys() and all(torch.equal(reference[k], got[k]) for k in reference)


def test_a_users_saved_tensor_hooks_keep_one_tensor_one_in_the_recomputation():
    """The same under a user's own saved-tensor hooks around the step, with a plan that only checkpoints."""
    torch.manual_seed(0)
    model, x = Encoder(), torch.randn(4, 16, 32)
    state = copy.deepcopy(model.state_dict())
    plan = minimum_plan(ckptplan.trace(model, x), rematerialize=False)
    assert any(r.path.startswith("encoder.layers.1") for r in plan.regions)
    reference = seeded_grads(model, x)
    model.load_state_dict(state)
    with ckptplan.apply(model, plan):
        for _ in range(2):  # the first step checks every region's ops, the next runs plain checkpoints
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                got = seeded_grads(model, x)
            assert all(torch.equal(reference[k], got[k]) for k in reference)
