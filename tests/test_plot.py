"""`sweep --plot`: estimated time and FLOPs in two panels, budgets as lines, memory in the model's unit."""

from __future__ import annotations

import pytest

from ckptplan.compare import SweepRow, memory_unit, pareto_figure

MiB = 2**20


def _row(budget: int, policy: str, peak: int, flops: int, ns: int, knob: str = "") -> SweepRow:
    return SweepRow(
        budget=f"{budget}MiB",
        budget_bytes=budget * MiB,
        policy=policy,
        knob=knob,
        fits=True,
        peak_bytes=peak * MiB,
        extra_forward_flops=flops,
        extra_cost_ns=ns,
    )


ROWS = [
    _row(12, "ckptplan", 11, 400, 2_000_000, "time"),
    _row(12, "op_sac", 11, 300, 3_000_000),
    _row(10, "ckptplan", 9, 700, 5_000_000, "time"),
    _row(10, "op_sac", 9, 600, 6_000_000),
    SweepRow(
        budget="8MiB",
        budget_bytes=8 * MiB,
        policy="ckptplan",
        knob="time",
        fits=False,
        peak_bytes=None,
        extra_forward_flops=None,
        extra_cost_ns=None,
        note="below the minimum",
    ),
]


def test_memory_unit_is_the_models_own():
    assert memory_unit(20 * MiB) == ("MiB", MiB) and memory_unit(3 * 2**30) == ("GiB", 2**30)
    assert memory_unit(5000) == ("KiB", 1024)


def test_two_panels_budgets_as_lines_and_ckptplan_only_on_its_objective():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = pareto_figure(ROWS, title="t", forward_flops=1000, forward_cost_ns=10_000_000)
    try:
        time_ax, flops_ax = fig.axes
        for ax in (time_ax, flops_ax):
            assert ax.get_xlabel().startswith("peak memory (MiB)")
            vertical = sorted(line.get_xdata()[0] for line in ax.get_lines() if len(set(line.get_xdata())) == 1)
            assert vertical == [8, 10, 12]  # the budgets, in MiB, the infeasible one too
        labels = {ax: [t.get_text() for t in ax.get_legend().get_texts()] for ax in (time_ax, flops_ax)}
        assert labels[time_ax] == ["ckptplan (minimises time)", "op_sac"]
        assert labels[flops_ax] == ["op_sac"]  # ckptplan minimised time: never drawn against FLOPs
        assert "step-time overhead" in time_ax.get_ylabel() and "FLOPs" in flops_ax.get_ylabel()
        ckpt = next(line for line in time_ax.get_lines() if line.get_label().startswith("ckptplan"))
        # % of a step of three forwards: 2 ms and 5 ms of 30 ms
        assert list(ckpt.get_xdata()) == [9, 11]
        assert [round(y, 3) for y in ckpt.get_ydata()] == [16.667, 6.667]
    finally:
        plt.close(fig)
