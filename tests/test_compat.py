"""ckptplan/_compat.py: every torch internal ckptplan uses is checked, and a missing one is named."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint

from ckptplan import _compat
from ckptplan._compat import REQUIRED, SUPPORTED, UnsupportedTorch, check_torch

ROOT = Path(__file__).resolve().parents[1]


def _private_uses(path: Path) -> set[tuple[str, str]]:
    """(module, name) for each private torch name a file imports, and each ``torch._x...`` chain it reads."""
    uses: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            module = node.module or ""
            for alias in node.names:
                if "._" in module or alias.name.startswith("_"):
                    uses.add((module, alias.name))
        elif isinstance(node, ast.Attribute):
            chain = []
            n: ast.expr = node
            while isinstance(n, ast.Attribute):
                chain.append(n.attr)
                n = n.value
            if isinstance(n, ast.Name) and n.id == "torch":
                dotted = ".".join(reversed(chain))
                if any(part.startswith("_") and not part.startswith("__") for part in chain):
                    uses.add(("torch", dotted))
    return uses


def _covered(module: str, name: str) -> bool:
    for group in REQUIRED.values():
        for req_module, req_path, _ in group:
            full = f"{req_module}.{req_path}"
            if (
                (req_module == module and req_path.split(".")[0] == name.split(".")[0])
                or full.startswith(f"{module}.{name}")
                or f"{module}.{name}".startswith(full)
            ):
                return True
    return False


def test_every_private_torch_use_is_required():
    files = sorted((ROOT / "ckptplan").rglob("*.py"))
    missing = sorted(
        {
            f"{f.relative_to(ROOT)}: {m}.{n}"
            for f in files
            if f.name != "_compat.py"
            for m, n in _private_uses(f)
            if not _covered(m, n)
        }
    )
    assert not missing, f"add these to ckptplan/_compat.py's REQUIRED and docs/torch-compat.md: {missing}"


def test_this_torch_passes_every_group():
    for group in REQUIRED:
        check_torch(group)


def test_missing_internal_is_named(monkeypatch):
    monkeypatch.delattr(torch.utils.checkpoint, "SAC_IGNORED_OPS")
    with pytest.raises(UnsupportedTorch, match=r"torch\.utils\.checkpoint\.SAC_IGNORED_OPS is missing") as e:
        check_torch()
    assert isinstance(e.value, ImportError) and SUPPORTED in str(e.value) and torch.__version__ in str(e.value)


def test_changed_signature_is_named(monkeypatch):
    def checkpoint(function, *args, use_reentrant=None, **kwargs):
        return function(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
    with pytest.raises(UnsupportedTorch, match="checkpoint takes no context_fn"):
        check_torch()


def test_every_problem_is_listed_at_once(monkeypatch):
    monkeypatch.delattr(torch.utils.checkpoint, "SAC_IGNORED_OPS")
    monkeypatch.delattr(torch.compiler, "is_compiling")
    with pytest.raises(UnsupportedTorch) as e:
        check_torch()
    assert "SAC_IGNORED_OPS" in str(e.value) and "is_compiling" in str(e.value)


def test_detach_falls_back_to_2_11s_spelling(monkeypatch):
    calls = []

    def maybe_detach(x, any_ret_has_alias_info):
        calls.append(any_ret_has_alias_info)
        return x.detach()

    monkeypatch.delattr(torch.utils.checkpoint, "_detach_helper", raising=False)
    monkeypatch.setattr(torch.utils.checkpoint, "_maybe_detach", maybe_detach, raising=False)
    detach = _compat._detach_function()
    out = detach(torch.ones(2, requires_grad=True) * 2)
    assert calls == [True] and not out.requires_grad  # True: every tensor detached, as _detach_helper does
    monkeypatch.delattr(torch.utils.checkpoint, "_maybe_detach")
    with pytest.raises(UnsupportedTorch, match="neither _detach_helper"):
        check_torch()


def test_detach_cached_keeps_storage_and_version():
    t = torch.ones(3, requires_grad=True) * 2
    d = _compat.detach_cached(t)
    assert not d.requires_grad and d.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    with torch.no_grad():
        t.add_(1)
    assert d._version == t._version  # a mutation after caching is seen (_VersionWrapper raises on it)


@pytest.mark.parametrize(
    ("version", "warns"), [("2.11.0+cu130", False), ("2.13.0+cpu", False), ("2.10.0", True), ("3.0.0", True)]
)
def test_release_outside_the_range_warns(monkeypatch, version, warns):
    monkeypatch.setattr(torch, "__version__", version)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_torch()
    assert bool(seen) is warns
    if warns:
        assert "untested" in str(seen[0].message)


@pytest.mark.parametrize(
    "use",
    [
        "import ckptplan; ckptplan.trace",  # the package binds its torch names on first use (NOTE [ Lazy package ])
        "from ckptplan.modelspec import load_model; load_model('x.py:f')",  # the CLI's way into torch
    ],
)
def test_first_use_names_what_is_missing(use):
    code = f"import torch.utils.checkpoint as c; del c.SAC_IGNORED_OPS; {use}"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ckptplan._compat.UnsupportedTorch") and "SAC_IGNORED_OPS is missing" in last


def test_pyproject_declares_ranges_and_constraints_pin():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [d for ds in project["optional-dependencies"].values() for d in ds]
    for spec in specs:
        assert "==" not in spec and re.search(r">=[\d.]+,<\d", spec), f"{spec}: declare a range"
    torch_spec = next(s for s in project["dependencies"] if s.startswith("torch"))
    assert torch_spec == f"torch{SUPPORTED}"
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().splitlines()


@pytest.mark.parametrize("counts_gqa", [True, False])
def test_grouped_query_attention_flops(monkeypatch, counts_gqa):
    """Attention with fewer key/value heads counts as if they were repeated to the query's heads, on
    every release: ckptplan.flops repeats them where torch's formulas refuse the shapes (2.11)."""
    from ckptplan import flops

    if counts_gqa and not _compat.SDPA_COUNTS_GQA:
        pytest.skip(f"torch {torch.__version__}'s formulas refuse grouped-query shapes")
    monkeypatch.setattr(_compat, "SDPA_COUNTS_GQA", counts_gqa)
    b, hq, hkv, s, d = 2, 8, 2, 16, 32
    q = torch.empty(b, hq, s, d, device="meta")
    k, v = torch.empty(b, hkv, s, d, device="meta"), torch.empty(b, hkv, s, d, device="meta")
    one_bmm = 2 * b * hq * s * s * d
    aten = torch.ops.aten
    forward = aten._scaled_dot_product_flash_attention.default
    assert flops.op_flops(forward, (q, k, v), {}, None) == 2 * one_bmm
    backward = aten._scaled_dot_product_flash_attention_backward.default
    assert flops.op_flops(backward, (q, q, k, v), {}, None) == 5 * one_bmm
    cpu = aten._scaled_dot_product_flash_attention_for_cpu.default
    assert flops.cost_flops(cpu, (q, k, v), {}, None, 0) == 2 * one_bmm
