"""Hostile and careless input through the CLI: a message and a documented exit code, never a traceback
or a hang. Each invocation runs under a time bound, so that a hang fails the test instead of the run."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

import ckptplan
from ckptplan.cli import app
from ckptplan.plan import Plan

SECONDS_PER_CASE = 20  # far above what any case needs (well under a second), far below a hang

MODEL_FILE = textwrap.dedent("""
    import sys
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), (torch.randn(4, 8),)

    def wrong_shape():
        return nn.Linear(4, 4), (torch.randn(2, 5),)

    def exits(code=3):
        sys.exit(code)

    class Exits(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            sys.exit(0)

    def exits_in_forward():
        return Exits(), (torch.randn(2, 4),)

    def not_a_model():
        return 42

    class Interrupted(nn.Module):
        def forward(self, x):
            raise KeyboardInterrupt  # Ctrl-C during the trace

    def interrupted():
        return Interrupted(), (torch.randn(2, 4),)
""")


@contextmanager
def bounded(seconds: float = SECONDS_PER_CASE):
    """Fail (TimeoutError) instead of hanging: SIGALRM interrupts a blocking open or a Python loop."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(*argv: str):
    with bounded():
        result = CliRunner().invoke(app, [str(a) for a in argv], env={"COLUMNS": "300"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"ckptplan {' '.join(map(str, argv))} raised {result.exception!r}") from result.exception
    return result


def message(result) -> str:
    return " ".join(result.stderr.split())


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(MODEL_FILE)
    (path.parent / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    return path


@pytest.fixture(scope="module")
def plan_text(model_file, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("plan") / "p.yaml"
    result = run("solve", "-b", "1GB", "-m", f"{model_file}:tiny", "-o", out, "-q", "--time-limit", "10")
    assert result.exit_code == 0, result.output
    return out.read_text()


# ---- the model's own code --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, expect",
    [
        ("wrong_shape", "mat1 and mat2 shapes cannot be multiplied"),
        ("exits", "SystemExit(3)"),  # 3 would read as "budget below the minimum"
        ("exits_in_forward", "SystemExit(0)"),  # 0 would read as success, with no plan written
        ("not_a_model", "must return (model, args)"),
    ],
)
def test_a_model_whose_step_fails_or_exits_gets_exit_2(model_file, tmp_path, factory, expect):
    out = tmp_path / "p.yaml"
    for command in (["solve", "-b", "1GB", "-o", out], ["trace"]):
        result = run(*command, "-m", f"{model_file}:{factory}", "-q")
        assert result.exit_code == 2, result.output
        assert expect in message(result)
    assert not out.exists()


def test_a_factory_argument_too_long_to_convert_gets_exit_2(model_file):
    result = run("trace", "-m", f"{model_file}:tiny", "-a", "batch=" + "9" * 5000)
    assert result.exit_code == 2 and "--arg batch" in message(result), result.output


def test_a_model_file_calling_sys_exit_on_import_gets_exit_2(model_file):
    result = run("trace", "-m", f"{model_file.parent / 'exits_on_import.py'}:tiny")
    assert result.exit_code == 2 and "calls sys.exit()" in message(result)


@pytest.mark.parametrize("command", [["trace"], ["solve", "-b", "1GB"], ["sweep", "--budgets", "50%"]])
def test_ctrl_c_during_the_trace_exits_130(model_file, command):
    result = run(*command, "-m", f"{model_file}:interrupted", "-q")
    assert result.exit_code == 130 and "interrupted" in message(result), result.output


# ---- output paths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["directory", "empty", "under-a-file", "proc"])
def test_an_output_path_that_cannot_be_a_file_exits_7_before_tracing(model_file, tmp_path, where):
    (tmp_path / "file").write_text("x")
    output = {
        "directory": str(tmp_path),
        "empty": "",
        "under-a-file": str(tmp_path / "file" / "p.yaml"),
        "proc": "/proc/ckptplan-test/p.yaml",
    }[where]
    # the model would fail its step: exit 7, not 2, shows the path is refused before the trace. /proc refuses
    # the write itself (even to root, whom os.access lets through): the model runs, the write fails
    factory = "tiny" if where == "proc" else "wrong_shape"
    result = run("solve", "-b", "1GB", "-m", f"{model_file}:{factory}", "-o", output, "--time-limit", "10")
    assert result.exit_code == 7, result.output
    assert "-o" in message(result)


def test_a_full_disk_exits_7_and_leaves_nothing(model_file, tmp_path, monkeypatch):
    def full(self, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Plan, "save", full)
    out = tmp_path / "p.yaml"
    result = run("solve", "-b", "1GB", "-m", f"{model_file}:tiny", "-o", out, "--time-limit", "10")
    assert result.exit_code == 7, result.output
    assert "the disk is full" in message(result) and not out.exists()


@pytest.mark.parametrize("plot, code", [("pareto.gif", 2), ("pareto", 2), ("file/pareto.png", 7)])
def test_sweep_plot_path_is_checked_before_the_sweep(model_file, tmp_path, plot, code):
    (tmp_path / "file").write_text("x")
    result = run("sweep", "--budgets", "70%", "-m", f"{model_file}:wrong_shape", "--plot", tmp_path / plot)
    assert result.exit_code == code, result.output
    assert "--plot" in message(result)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "-inf"])
@pytest.mark.parametrize("command", [["solve", "-b", "1GB"], ["sweep", "--budgets", "50%"]])
def test_a_time_limit_that_is_not_a_positive_number_exits_2(model_file, command, value):
    result = run(*command, "-m", f"{model_file}:wrong_shape", "--time-limit", value)
    assert result.exit_code == 2 and "--time-limit" in message(result), result.output


def test_a_stale_temporary_from_a_killed_writer_is_removed_by_the_next_write(plan_text, tmp_path):
    plan = ckptplan.load_plan(_write(tmp_path / "p.yaml", plan_text))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".p.yaml.{int(dead.stdout)}.abcd1234.tmp"  # its writer was killed mid-write
    alive = tmp_path / f".p.yaml.{os.getppid()}.abcd1234.tmp"  # another writer, still running
    stale.write_text("half a pl")
    alive.write_text("half a pl")
    plan.save(tmp_path / "p.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p.yaml", alive.name])
    assert ckptplan.load_plan(tmp_path / "p.yaml") == plan


# ---- plan files ---------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda t: ALIAS_BOMB + t, "aliases"),
        (lambda t: t.replace("model:", "model: &m") + "extra: *m\n", "aliases"),
        (lambda t: t.replace("\nparameters: ", "\nparameters: " + "9" * 5000 + "#"), "digits"),
        (lambda t: t.replace('parallel: ""', 'parallel: "ddp:two"'), "parallel"),
        (lambda t: t.replace('parallel: ""', 'parallel: "fsdp"'), "parallel"),
        (lambda t: "[" * 3000 + "]" * 3000, "regenerate"),
    ],
)
def test_a_hostile_plan_file_exits_2_quickly(plan_text, model_file, tmp_path, edit, expect):
    path = _write(tmp_path / "p.yaml", edit(plan_text))
    for command in (["show", path], ["show", path, "-m", f"{model_file}:tiny"], ["diff", path, path]):
        result = run(*command)
        assert result.exit_code == 2, result.output
        assert expect in message(result) and str(path) in message(result)


def test_a_fifo_as_plan_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "plan.yaml"
    os.mkfifo(fifo)
    result = run("show", fifo)
    assert result.exit_code == 2 and "not a regular file" in message(result)


# ---- fuzz: plan files and model specs ---------------------------------------------------------------------
SCALARS = st.one_of(
    st.integers(),
    st.integers(min_value=10**40, max_value=10**60),
    st.just("9" * 5000),
    st.floats(),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.just("*a"),
    st.just("&a x"),
    st.just("!!python/object:os.system"),
    st.just("[1, [2, [3]]]"),
    st.just("{a: 1}"),
)


@st.composite
def edited_plans(draw, text: str) -> str:
    """A plan file with a few of its lines replaced, cut, duplicated or given another value."""
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["value", "delete", "duplicate", "cut", "noise"]))
        if how == "value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(SCALARS)}"
        elif how == "value" and lines[i].lstrip().startswith("- ["):
            row = lines[i].split("[", 1)[1].rstrip("]").split(", ")
            row[draw(st.integers(0, len(row) - 1))] = str(draw(SCALARS))
            lines[i] = lines[i].split("[", 1)[0] + "[" + ", ".join(row) + "]"
        elif how == "delete":
            del lines[i]
        elif how == "duplicate":
            lines.insert(i, lines[i])
        elif how == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        else:
            lines[i] = draw(st.text(max_size=30))
        if not lines:
            break
    return "\n".join(lines) + "\n"


FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(data=st.data())
def test_fuzzed_plan_files_get_a_message_never_a_traceback_or_hang(plan_text, tmp_path, data):
    path = _write(tmp_path / "fuzzed.yaml", data.draw(edited_plans(plan_text)))
    for command in (["show", path], ["show", path, "--json"], ["diff", path, path]):
        result = run(*command)
        assert result.exit_code in (0, 2), result.output
        if result.exit_code:
            assert "error:" in result.stderr


@FUZZ
@given(
    factory=st.sampled_from(
        ["tiny", "wrong_shape", "exits", "exits_in_forward", "not_a_model", "nothing", "", "1x", "sys"]
    ),
    where=st.sampled_from(["file", "missing", "module", "text"]),
    text=st.text(max_size=20),
    args=st.lists(st.tuples(st.sampled_from(["code", "batch", "x", "1", ""]), SCALARS), max_size=2),
)
def test_fuzzed_model_specs_get_a_message_never_a_traceback_or_hang(model_file, factory, where, text, args):
    target = {
        "file": str(model_file),
        "missing": str(model_file.parent / "nope.py"),
        "module": "no_such_package_ckptplan.models",
        "text": text.replace(":", ""),
    }[where]
    argv = ["trace", "-m", f"{target}:{factory}", "-q"]
    for name, value in args:
        argv += ["-a", f"{name}={value}"]
    result = run(*argv)
    assert result.exit_code in (0, 2), result.output
    assert (result.exit_code == 0) == (where == "file" and factory == "tiny" and not args)
