"""The CLI answers --help without importing torch or OR-Tools, and checks optional dependencies first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckptplan.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner(env={"COLUMNS": "300"})
HEAVY = ("torch", "ortools", "numpy", "matplotlib", "fastapi")


def test_help_imports_no_torch_nor_ortools():
    # a fresh interpreter: this one has torch loaded already
    code = """
import sys
import typer.main
from ckptplan.cli import app
command = typer.main.get_command(app)
for args in (["--help"], ["solve", "--help"], ["sweep", "--help"], ["fit", "--help"], ["serve", "--help"]):
    try:
        command.main(args, prog_name="ckptplan", standalone_mode=False)
    except SystemExit:
        pass
print("loaded:", *sorted(m for m in %r if m in sys.modules))
""" % (HEAVY,)
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "", "COLUMNS": "120"},
    )
    assert r.returncode == 0, r.stderr
    assert "Usage: ckptplan fit" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "loaded:"


def test_import_ckptplan_binds_its_api_on_first_use():
    code = (
        "import sys, ckptplan; before = 'torch' in sys.modules; f = ckptplan.trace; import ckptplan.trace; "
        "print(before, callable(f), ckptplan.trace is f, ckptplan.auto.__name__, 'solve' in dir(ckptplan), "
        "ckptplan.plan.__name__, hasattr(ckptplan, 'nothing'))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "True", "auto", "True", "ckptplan.plan", "False"]


def test_plot_without_matplotlib_fails_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package imports as
    # the model file does not exist: the check must come before the model is even loaded
    result = runner.invoke(
        app, ["sweep", "--budgets", "50%", "-m", f"{tmp_path / 'absent.py'}:f", "--plot", str(tmp_path / "p.png")]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--plot needs matplotlib" in text and "pip install 'ckptplan[plot]'" in text
    assert "absent.py" not in text and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_its_extra_names_it(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    result = runner.invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"ckptplan serve needs {missing}" in text and "pip install 'ckptplan[serve]'" in text
