"""Module paths as people read them: folded (``h.{0-11}.attn``), expanded again, sorted in model order."""

from __future__ import annotations

import re


def fold_paths(paths: list[str]) -> str:
    """Fold paths that differ in one numeric component: ``h.0.attn, h.1.attn, h.3.attn`` -> ``h.{0-1,3}.attn``.

    Anything else is joined with commas. ``expand_paths`` inverts it.
    """
    parts = [p.split(".") for p in paths]
    if len(paths) > 1 and len({len(x) for x in parts}) == 1:
        varying = [i for i in range(len(parts[0])) if len({x[i] for x in parts}) > 1]
        if len(varying) == 1 and all(x[varying[0]].isdigit() for x in parts):
            i = varying[0]
            nums = [int(x[i]) for x in parts]
            if nums == sorted(set(nums)) and all(str(n) == x[i] for n, x in zip(nums, parts)):
                runs: list[str] = []
                start: int | None = nums[0]
                for a, b in zip(nums, [*nums[1:], None]):
                    if b != a + 1:
                        runs.append(str(start) if start == a else f"{start}-{a}")
                        start = b
                return ".".join(parts[0][:i] + [f"{{{','.join(runs)}}}"] + parts[0][i + 1 :])
    return ",".join(paths)


def path_order(path: str) -> list[tuple[int, str]]:
    """Sort key of module paths in their numeric order: ``h.2`` before ``h.10``."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in path.split(".")]


def fold_names(paths: list[str]) -> list[tuple[str, list[str]]]:
    """(label, members) of paths grouped by their layer numbers, in the order each group first appears:
    ``h.0.attn, h.0.mlp, h.1.attn`` -> ``[("h.{0-1}.attn", [h.0.attn, h.1.attn]), ("h.0.mlp", [h.0.mlp])]``;
    a group with two varying numbers is labelled with ``*`` (``layers.*.blocks.*``)."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", p), []).append(p)
    out = []
    for pattern, members in groups.items():
        folded = fold_paths(sorted(set(members), key=path_order)) if len(members) > 1 else members[0]
        out.append((folded if "{" in folded or len(members) == 1 else pattern, members))
    return out


def expand_paths(text: str) -> list[str]:
    m = re.fullmatch(r"(.*)\{([\d,\-]+)\}(.*)", text)
    if not m:
        return [p for p in text.split(",") if p]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}{i}{m.group(3)}" for i in range(int(lo), int(hi or lo) + 1)]
    return out
