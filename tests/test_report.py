"""Rendering for humans: folded names in model order, durations, the one-line answer."""

from __future__ import annotations

import pytest

from ckptplan import report
from ckptplan.names import expand_paths, fold_names, path_order
from ckptplan.plan import load_plan

from .conftest import ROOT


def test_path_order_is_numeric():
    paths = ["h.10.mlp", "h.2.mlp", "h.1.attn", "h.1.mlp", "ln_f", "h.0.attn"]
    assert sorted(paths, key=path_order) == ["h.0.attn", "h.1.attn", "h.1.mlp", "h.2.mlp", "h.10.mlp", "ln_f"]


def test_fold_names_groups_layers_in_first_seen_order():
    paths = [f"h.{i}.{part}" for i in (0, 1, 2, 10, 11) for part in ("attn", "mlp")] + ["ln_f"]
    got = fold_names(paths)
    assert [(label, len(m)) for label, m in got] == [("h.{0-2,10-11}.attn", 5), ("h.{0-2,10-11}.mlp", 5), ("ln_f", 1)]
    assert expand_paths(got[0][0]) == [p for p in paths if p.endswith("attn")]
    nested = fold_names(["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"])
    assert nested == [("layers.*.blocks.*", ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"])]


@pytest.mark.parametrize("ns, text", [(36_744_692, "36.7 ms"), (820_000, "820 µs"), (2_410_000_000, "2.41 s")])
def test_format_ns(ns, text):
    assert report.format_ns(ns) == text


def test_answer_leads_with_saved_memory_costs_and_folded_regions():
    plan = load_plan(ROOT / "plans" / "gpt2_small-8GB.yaml")
    text = report.answer(plan, forward_cost_ns=plan.extra_cost_ns)  # recompute = one forward: 33.3% of a step
    assert text.startswith(
        "saves 2.50 GiB: peak 7.30 GiB of budget 7.45 GiB (9.80 GiB without checkpointing); "
        "+33.3% est. step time, est. recompute 3.6 ms, +33.5% FLOPs; checkpoints "
    )
    assert "transformer.h.{0-5}.mlp (6)" in text
    assert "estimated_recompute_ns" not in str(report.summary_table(plan).columns)
