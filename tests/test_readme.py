"""README's commands stay true: CI runs its test line, and its main command reproduces plans/."""

from __future__ import annotations

import re
import subprocess

from typer.testing import CliRunner

from ckptplan.cli import app

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


def command_after(marker: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", README, re.S)
    assert m, f"README.md has no ```bash block after <!-- {marker} -->"
    return m.group(1)


def test_ci_runs_the_readme_test_command():
    out = subprocess.run(
        [
            "awk",
            r"/<!-- test-command -->/ {found=1; next} found && /^```/ "
            r"{if (inblock) exit; inblock=1; next} inblock {print}",
            "README.md",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == command_after("test-command")
    assert "awk '/<!-- test-command -->/" in (ROOT / ".ci" / "run").read_text()
    assert "constraints.txt" in out and "pytest" in out
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_main_command_reproduces_the_committed_plan(tmp_path):
    main = command_after("main-command")
    assert main.endswith("ckptplan solve --budget 8GB")
    out = tmp_path / "plan.yaml"
    result = CliRunner().invoke(app, ["solve", "--budget", "8GB", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert out.read_text() == (ROOT / "plans" / "gpt2_small-8GB.yaml").read_text()


def test_training_loop_snippet_runs(tmp_path, monkeypatch):
    """README's training-loop block, verbatim, on the tiny GPT-2: it plans, saves, applies, trains, removes."""
    import torch

    from gpt2 import gpt2_tiny

    m = re.search(r"<!-- training-loop -->\s*```python\n(.+?)\n```", README, re.S)
    assert m, "README.md has no ```python block after <!-- training-loop -->"
    model, (x, y) = gpt2_tiny(batch_size=8, seq_len=128)  # activations dominate its peak
    scope = {
        "model": model,
        "x": x,
        "y": y,
        "loader": [(x, y)] * 2,
        "opt": torch.optim.SGD(model.parameters(), lr=1e-3),
    }
    monkeypatch.chdir(tmp_path)
    exec(compile(m.group(1), "README.md", "exec"), scope)
    assert (tmp_path / "plans" / "model.yaml").is_file()
    handle = scope["handle"]
    assert handle.stats.steps == 2 and handle.stats.extra_forward_flops > 0  # the 70% plan recomputes
    from ckptplan import Handle

    assert Handle.of(model) is None  # handle.remove() left the plain model
