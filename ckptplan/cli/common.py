"""What the commands share: the app, the console, the options and the checks before any work."""

from __future__ import annotations

# NOTE [ Lazy package ] (cli/__init__.py): torch and OR-Tools are imported inside the commands, never here.
import errno
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import CkptplanError, InfeasibleBudget, InputError, OutputError
from ..modelspec import BUNDLED_EXAMPLE, bundled_example, load_model, parse_factory_args
from ..units import format_flops

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Plan activation checkpointing for PyTorch training under a memory budget.",
)
err = Console(stderr=True)
SYNTAX_REFERENCE = 2**50  # stands in for the no-checkpointing peak when only the syntax is checked
# the package's extras (pyproject.toml) -> the modules they install, checked before an option needing them works
EXTRAS = {"plot": ("matplotlib",), "serve": ("fastapi", "uvicorn")}
PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "webp", "eps", "ps", "tif", "tiff")  # matplotlib's savefig

ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m", help=f"path/to/file.py:factory or package.module:factory (default: {BUNDLED_EXAMPLE})."
    ),
]
ArgOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--arg", "-a", help="Keyword argument for the factory, name=value (repeatable), e.g. -a batch_size=4."
    ),
]
OptimizerOpt = Annotated[
    Optional[str],
    typer.Option(help="Add this optimizer's state to the fixed memory: adamw, adam, sgd, momentum, adagrad, rmsprop."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ParallelOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Data parallelism the step runs under: ddp or fsdp (FSDP2 fully_shard per block). The model spec "
        "gives one rank's batch; the budget is per rank."
    ),
]
WorldOpt = Annotated[int, typer.Option(help="Number of data-parallel ranks (with --parallel).")]
ObjectiveOpt = Annotated[
    str,
    typer.Option(
        help="What to minimise: time (estimated recompute time, the default) or flops (recomputed FLOPs, then time)."
    ),
]
SeqLenOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Comma-separated sequence lengths, passed to the factory as seq_len=...: one plan that holds for "
        "each (its peak fits at the largest)."
    ),
]
RematOpt = Annotated[
    bool,
    typer.Option(
        "--remat/--no-remat",
        help="Let the plan also rematerialize: drop tensors backward would hold (a BatchNorm + "
        "ReLU output the next convolution saves) and rebuild them from what backward keeps "
        "anyway. --no-remat plans checkpoints only (needed under torch.compile).",
    ),
]


TargetOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Device type the plan is for: cuda or cpu (default: cuda for a model built on the meta device or "
        "with fake tensors, which then takes CUDA's kernels: fused attention and dropout; cpu for a real CPU "
        "model).",
        show_default=False,
    ),
]
GpuOpt = Annotated[
    Optional[str],
    typer.Option(
        help="GPU a cuda plan is for: h100, h200, a100, a100-40gb, l4, ... or a compute capability (9.0); it "
        "decides the attention kernel and what --budget card means (default: h100).",
        show_default=False,
    ),
]
SdpaOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Attention kernel a meta trace takes: auto (torch's choice for the GPU), cudnn, flash, efficient or "
        "math (as your run's torch.nn.attention.sdpa_kernel forces).",
        show_default=False,
    ),
]
AutocastOpt = Annotated[
    Optional[str],
    typer.Option(
        help="The step runs forward and loss under torch.autocast with this dtype: bf16 or fp16 (a meta trace then "
        "makes the casts CUDA's autocast makes; a real model runs torch's autocast).",
        show_default=False,
    ),
]
ProfileOpt = Annotated[
    Optional[Path],
    typer.Option(
        help="Device cost profile (YAML/JSON, as benchmarks/calibration/gpu_calibrate.py writes it) the "
        "recompute time is estimated with (default: the built-in profile of the target).",
        show_default=False,
    ),
]


def where_of(target: str | None, gpu: str | None, sdpa: str | None, autocast: str | None = None) -> dict[str, Any]:
    """trace()'s target keywords, those given only."""
    return {
        k: v for k, v in (("target", target), ("gpu", gpu), ("sdpa", sdpa), ("autocast", autocast)) if v is not None
    }


def plan_where(plan: Any) -> dict[str, Any]:
    """trace()'s target keywords for the step a plan was made for (none for a plan older than targets)."""
    return where_of(
        plan.device if plan.device in ("cpu", "cuda") else None, plan.gpu or None, None, plan.autocast or None
    )


def card_budget(budget: str, where: dict[str, Any]) -> str:
    """``--budget card``: the GPU's memory less the CUDA context and the allocator's fragmentation."""
    if budget.strip().lower() != "card":
        return budget
    from ..target import parse_gpu

    if where.get("target", "cuda") != "cuda":
        raise InputError("--budget card is a GPU's memory: it needs a cuda target (and --gpu)")
    return str(parse_gpu(where.get("gpu")).card_budget())


def fail(e: CkptplanError, as_json: bool) -> None:
    if as_json:
        payload: dict[str, Any] = {"error": type(e).__name__, "message": str(e), "exit_code": e.exit_code}
        if isinstance(e, InfeasibleBudget):
            payload["minimum_bytes"] = e.minimum_bytes
            payload["minimum_proven"] = e.minimum_proven
            payload["minimum_source"] = e.minimum_source
            payload["minimum_lower_bytes"] = e.minimum_lower_bytes
        print(json.dumps(payload, indent=2))
    err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
    raise typer.Exit(e.exit_code)


def require_extra(extra: str, what: str) -> None:
    """Refuse, before any work, ``what`` when the modules of the package's extra ``extra`` are missing."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install 'ckptplan[{extra}]' (or pip install {' '.join(missing)})"
        )


def interrupted(what: str = "nothing written") -> NoReturn:
    err.print(f"interrupted: {what}")
    raise typer.Exit(130)


def trace_step(
    model: str | None,
    args: list[str] | None,
    optimizer: str | None,
    quiet: bool,
    parallel: str | None = None,
    world_size: int = 1,
    seq_lens: list[int] | None = None,
    where: dict[str, Any] | None = None,
):
    from .. import _compat  # noqa: F401  first: names any torch internal this torch lacks
    from ..parallel import Parallel, for_ranks
    from ..trace import trace

    if parallel is not None and parallel not in {p.value for p in Parallel}:
        raise typer.BadParameter("choose ddp or fsdp", param_hint="--parallel")
    if world_size < 1 or (world_size > 1 and parallel is None):
        raise typer.BadParameter("a world size above 1 needs --parallel ddp or fsdp", param_hint="--world-size")
    factory_kwargs = parse_factory_args(args or [])
    graphs = []
    lens: list[int | None] = list(seq_lens) if seq_lens else [None]
    for n in lens:
        loaded = load_model(
            model or bundled_example(), factory_kwargs if n is None else {**factory_kwargs, "seq_len": n}
        )
        with (
            err.status(f"tracing one training step{f' (seq_len {n})' if n else ''}...", spinner="dots")
            if not quiet
            else null_status(),
            model_code(loaded.name),
        ):
            graph = trace(
                loaded.model,
                *loaded.args,
                optimizer=optimizer,
                model_name=loaded.name,
                **(where or {}),
                **loaded.kwargs,
            )
        graphs.append(for_ranks(graph, world_size=world_size, mode=parallel) if parallel else graph)
    return loaded, graphs[0] if seq_lens is None else graphs


class model_code:
    """Runs the user's model: what its step raises (a shape error, sys.exit) becomes an InputError (exit 2)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: Any, _tb: Any) -> None:
        if (
            kind is None
            or issubclass(kind, (CkptplanError, KeyboardInterrupt))
            or not issubclass(kind, (Exception, SystemExit))
        ):
            return
        what = f"SystemExit({e.code!r}) (it calls sys.exit())" if isinstance(e, SystemExit) else f"{kind.__name__}: {e}"
        raise InputError(
            f"running one training step of {self.name} raised {what}. Check that the factory's "
            "inputs fit the model (run model(*args) once without ckptplan); if they do, this is a "
            "ckptplan bug: please report it with the model"
        ) from None


def check_time_limit(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        raise typer.BadParameter(
            f"give a positive number of seconds, e.g. 30 (not {seconds})", param_hint="--time-limit"
        )


def check_output(path: Path, option: str) -> None:
    """Refuse, before any work, an output path that cannot be a file we write."""
    if str(path) in ("", ".") or path.is_dir():
        raise OutputError(f"{option} {str(path)!r} is a directory; give a file name, e.g. {path / 'plan.yaml'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: the folder {parent} is not writable; choose another path")


def write_file(path: Path, option: str, write: Any) -> None:
    """``write()`` creates ``path``; an OSError (read-only file system, disk full, ...) becomes OutputError."""
    try:
        write()
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise OutputError(f"cannot write {option} {path}: {why}; nothing was written there") from None


def parse_seq_lens(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise typer.BadParameter(
            "give whole numbers separated by commas, e.g. 2048,4096,8192", param_hint="--seq-len"
        ) from None
    if not values or values[0] < 1:
        raise typer.BadParameter("give positive lengths, e.g. 2048,4096,8192", param_hint="--seq-len")
    return values


def progress_line(status: Any):
    """Turn the planner's progress notes into one live status line: phase, best objective, gap, time."""
    import time

    started = time.monotonic()

    def note(phase: str, info: dict) -> None:
        text = f"[bold]{phase}[/bold]"
        for unit, show in (
            ("ns", lambda v: f"{v / 1e6:.2f} ms recompute"),
            ("flops", lambda v: f"{format_flops(int(v))} recomputed"),
        ):
            if f"objective_{unit}" in info:
                obj = info[f"objective_{unit}"]
                bound = info.get(f"bound_{unit}", obj)
                text += f"  best {show(obj)}, gap {100 * ((obj - bound) / obj if obj else 0.0):.1f}%"
        if "regions" in info:
            text += f"  {info['regions']} candidate regions"
        status.update(f"{text}  ({time.monotonic() - started:.1f} s)")

    return note


class null_status:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def console() -> Console:
    """Rich output on stderr at the terminal's width (COLUMNS where set; 80 when piped)."""
    return err


def check_depth(depth: int | None) -> None:
    if depth is not None and depth < 1:
        raise typer.BadParameter(f"give a depth of 1 or more, e.g. 3 (not {depth})", param_hint="--depth")
