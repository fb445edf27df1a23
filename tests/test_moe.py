"""Mixture of experts with data-dependent routing: one plan for every batch.

The experts run as Hugging Face's eager implementations do (Mixtral, Qwen2-MoE with
``experts_implementation="eager"``): ``nonzero`` on the routing, then one iteration per expert hit over
the tokens routed to it, so the number of ops and their shapes change from batch to batch
(graph.py's NOTE [ Data-dependent spans ]).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ckptplan
from ckptplan.decisions import check_plan
from ckptplan.graph import Forced
from ckptplan.measure import measure_peak
from ckptplan.plan import Decision
from ckptplan.trace import default_loss

D, HIDDEN, EXPERTS, TOP_K, TOKENS = 32, 256, 4, 2, 512


class Experts(nn.Module):
    """Mixtral's eager expert loop: the experts' weights as 3-d parameters, an iteration per expert hit."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(EXPERTS, 2 * HIDDEN, D) / D**0.5)
        self.down = nn.Parameter(torch.randn(EXPERTS, D, HIDDEN) / HIDDEN**0.5)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        with torch.no_grad():
            mask = nn.functional.one_hot(index, EXPERTS).permute(2, 1, 0)  # expert, k, token
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = e[0]
            k, token = torch.where(mask[e])
            gate, up = nn.functional.linear(x[token], self.gate_up[e]).chunk(2, dim=-1)
            h = nn.functional.linear(nn.functional.silu(gate) * up, self.down[e])
            out.index_add_(0, token, h * weights[token, k, None])
        return out


class MoeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.router = nn.Linear(D, EXPERTS, bias=False)
        self.experts = Experts()
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        logits = self.router(h)
        weights, index = torch.topk(logits.softmax(-1), TOP_K, dim=-1)
        return x + self.proj(torch.relu(self.experts(h, index, weights)))


class Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.blocks = nn.ModuleList(MoeBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return x.pow(2).mean()


def _batch(seed: int) -> torch.Tensor:
    """Tokens around a centre of their own: each batch routes its own way, some far from balanced."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, D, generator=g) + 3 * torch.randn(D, generator=g)


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(0)
    model = Moe().train()
    return model, copy.deepcopy(model.state_dict())


def _grads(model: nn.Module, state: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    default_loss(model(x)).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _peak(model: nn.Module, state: dict, x: torch.Tensor) -> int:
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    try:
        return measure_peak(model, x)
    finally:
        model.zero_grad(set_to_none=True)


def test_the_routing_is_traced_as_data_dependent(moe):
    model, _ = moe
    graph = ckptplan.trace(model, _batch(0))
    spans = graph.data_dependent_spans()
    assert [sp.owner for sp in spans] == [f"blocks.{i}.experts" for i in range(3)]
    assert all(graph.ops[sp.start].name == "aten.nonzero.default" for sp in spans)
    # another routing: other ops in the spans, the same fingerprint (what a plan depends on)
    other = ckptplan.trace(model, _batch(7))
    assert [(o.name, o.outputs[0].shape if o.outputs else ()) for o in other.ops] != [
        (o.name, o.outputs[0].shape if o.outputs else ()) for o in graph.ops
    ]
    assert other.fingerprint == graph.fingerprint


def test_one_plan_trains_on_every_routing_bitwise(moe):
    """Before the fix the plan identified the experts' ops by position and shape: PlanMismatch at the first
    batch routed otherwise than the traced one."""
    model, state = moe
    graph = ckptplan.trace(model, _batch(0))
    plan = ckptplan.solve(graph, int(0.6 * graph.baseline_peak_bytes), time_limit_s=3)
    assert plan.regions, "the budget must force checkpointing"
    for r in plan.regions:  # nothing inside the routing is saved by position or rematerialized
        varies = next((i for i, o in enumerate(r.ops) if o.forced is Forced.DATA_DEPENDENT), len(r.ops))
        assert all(o.decision is Decision.RECOMPUTE for o in r.ops[varies:])
    assert not any(r.remat and ".experts" in r.path for r in plan.regions)
    batches = [_batch(s) for s in range(1, 7)]
    expected = [_grads(model, state, x) for x in batches]
    with ckptplan.apply(model, plan):
        for x, want in zip(batches, expected):
            got = _grads(model, state, x)
            assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_plan_for_several_routings_fits_each_of_them(moe):
    """Solved for the routings of several batches, the plan's predicted peak is the worst of them and each
    batch's measured peak fits it to the byte."""
    model, state = moe
    batches = [_batch(s) for s in (0, 3, 5, 11)]
    graphs = [ckptplan.trace(model, x) for x in batches]
    with pytest.raises(ckptplan.InfeasibleBudget) as e:
        ckptplan.solve(graphs, 1, time_limit_s=3)
    plan = ckptplan.solve(graphs, e.value.minimum_bytes, time_limit_s=3)  # where the routing decides the peak
    assert plan.shapes == (graphs[0].inputs,) and len(plan.fingerprints) == 1
    peaks = []
    with ckptplan.apply(model, plan):
        for x, g in zip(batches, graphs):
            peaks.append(_peak(model, state, x))
            assert check_plan(g, plan).peak_bytes == peaks[-1]  # each routing simulated to the byte
    assert max(peaks) == plan.predicted_peak_bytes <= plan.budget_bytes
    assert len(set(peaks)) > 1, "the routings should differ in peak, or this test checks nothing"
