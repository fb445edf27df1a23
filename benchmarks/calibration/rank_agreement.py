"""How well measured step time follows the cost model, against how well the measurement follows itself.

Run by hand after two or more runs of the policy benchmark with the same code (seconds):
    python benchmarks/calibration/rank_agreement.py benchmarks/results/policies/results.json \
        benchmarks/results/policies/repeat/results.json --out benchmarks/results/policies/rank_agreement.md

On tiny CPU models one configuration's step-time ratio moves by ~10% from run to run, as much as many
configurations differ. Per model, over the configurations every run measured (run.py's
``timed_configs``), Spearman rank correlations between:

* the runs' measured step-time ratios, pairwise: how well a measurement predicts the next one;
* the cost model's predicted time (the first run's) and each run's measured ratios;
* the prediction and the mean of the runs' ratios (noise averages out).

The prediction can only agree with one run as well as the runs agree with each other, plus the noise
it does not share; the mean of several runs is the fairer target.

Pairwise, the order itself: a pair of configurations is *settled* when every run orders it the same way
(measured step-time ratios), and the cost model agrees on it when it predicts that order (it may also
price the pair alike: a tie, counted apart). The pairs the runs disagree on are ones the measurement
cannot order. Two runs also agree by chance on half the pairs whose configurations cost the same; a
pair is *distinct* when, in every run, the step times the two add (``extra_step_s``) differ in the same
direction by more than ``Z`` standard errors of their difference (runs that recorded them).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, run.py, policies.py

from common import spearman
from run import step_ratio, timed_configs

Z = 2.0  # standard errors apart, in every run: a distinct pair


def compare(runs: list[list[dict]]) -> list[dict]:
    out = []
    for results in zip(*runs):
        configs = [timed_configs(res) for res in results]
        keys = sorted(set.intersection(*(set(c) for c in configs)), key=str)
        measured = [[step_ratio(c[k]) for k in keys] for c in configs]
        predicted = [configs[0][k]["predicted_cost_ns"] for k in keys]
        mean = [statistics.mean(m[i] for m in measured) for i in range(len(keys))]
        out.append(
            {
                "model": results[0]["model"],
                "configs": len(keys),
                "run_vs_run": [round(spearman(a, b), 3) for a, b in combinations(measured, 2)],
                "predicted_vs_run": [round(spearman(predicted, m), 3) for m in measured],
                "predicted_vs_mean": round(spearman(predicted, mean), 3),
                **settled_pairs(predicted, measured),
                **distinct_pairs(predicted, [[c[k] for k in keys] for c in configs]),
            }
        )
    return out


def distinct_pairs(predicted: list[int], rows: list[list[dict]]) -> dict[str, int | None]:
    """Pairs whose extra step times differ by more than Z standard errors, the same way in every run
    (``rows``: per run, each configuration's row); of those, how many the prediction orders so too.
    None when a run did not record the standard errors."""
    if any("extra_step_se_s" not in row for run in rows for row in run):
        return {"distinct_pairs": None, "predicted_agrees_distinct": None}
    distinct = agreed = 0
    for i, j in combinations(range(len(predicted)), 2):
        sign = distinct_sign(rows, i, j)
        if sign:
            distinct += 1
            agreed += ((predicted[i] > predicted[j]) - (predicted[i] < predicted[j])) == sign
    return {"distinct_pairs": distinct, "predicted_agrees_distinct": agreed}


def distinct_sign(rows: list[list[dict]], i: int, j: int) -> int:
    """1 (or -1) when configuration ``i`` adds more (or less) step time than ``j`` by more than ``Z``
    standard errors of their difference in every run of ``rows``; 0 when some run does not tell them apart
    or the runs disagree."""
    signs = set()
    for run in rows:
        a, b = run[i], run[j]
        gap = a["extra_step_s"] - b["extra_step_s"]
        spread = (a["extra_step_se_s"] ** 2 + b["extra_step_se_s"] ** 2) ** 0.5
        signs.add((gap > Z * spread) - (gap < -Z * spread))
    return signs.pop() if len(signs) == 1 else 0


def settled_pairs(predicted: list[int], measured: list[list[float]]) -> dict[str, int]:
    """Pairs every run orders the same way; of those, how many the prediction orders so too, or ties."""
    pairs = settled = agreed = tied = 0
    for i, j in combinations(range(len(predicted)), 2):
        pairs += 1
        signs = {(m[i] > m[j]) - (m[i] < m[j]) for m in measured}
        if len(signs) != 1 or 0 in signs:
            continue
        settled += 1
        order = (predicted[i] > predicted[j]) - (predicted[i] < predicted[j])
        agreed += order == signs.pop()
        tied += order == 0
    return {"pairs": pairs, "settled_pairs": settled, "predicted_agrees": agreed, "predicted_ties": tied}


def _share(pairs: int | None, agreed: int | None) -> str:
    if pairs is None or agreed is None:
        return "not recorded | |"
    return f"{pairs} | {agreed} ({100 * agreed / max(1, pairs):.0f}%) |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="results.json of runs with the same code, the first one's predictions used")
    ap.add_argument("--out", required=True, help="Markdown file to write (a .json beside it)")
    a = ap.parse_args()
    if len(a.runs) < 2:
        ap.error("give at least two runs")
    data = [json.loads(Path(p).read_text()) for p in a.runs]
    if len({re.sub(r"--out \S+", "", d["command"]) for d in data}) != 1:
        print("warning: the runs were made with different options", file=sys.stderr)
    rows = compare([d["results"] for d in data])
    out = Path(a.out)
    command = "python benchmarks/calibration/rank_agreement.py " + " ".join(a.runs) + f" --out {a.out}"
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": a.runs, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Rank agreement: cost model against measured step time\n",
        f"`{command}`\n",
        f"Runs: {', '.join(f'`{p}`' for p in a.runs)} ({data[0]['command']}; {data[0]['machine']}). "
        "Spearman rank correlation over the configurations every run measured; then the pairs of "
        "configurations every run orders the same way (settled), and how many of those the cost model "
        "orders the same way (a tie: it prices the pair alike); then the pairs whose extra step times "
        f"differ by more than {Z:g} standard errors the same way in every run (distinct), and how many of "
        "those the cost model orders the same way.\n",
        "| model | configs | measured run vs run | predicted vs each run | predicted vs mean of runs "
        "| settled pairs / pairs | prediction agrees | prediction ties | distinct pairs | prediction agrees |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{r['predicted_agrees']} ({100 * r['predicted_agrees'] / max(1, r['settled_pairs']):.0f}%)"
        lines.append(
            f"| {r['model']} | {r['configs']} | {', '.join(map(str, r['run_vs_run']))} | "
            f"{', '.join(map(str, r['predicted_vs_run']))} | {r['predicted_vs_mean']} | "
            f"{r['settled_pairs']} / {r['pairs']} | {share} | {r['predicted_ties']} | "
            f"{_share(r['distinct_pairs'], r['predicted_agrees_distinct'])}"
        )
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
