"""Prepare the wheel folder that lets ckptplan run on the GPU machine, which has no package registry.

The GPU machine (Python 3.12, x86-64 Linux) holds torch, numpy, pandas, typer, pyyaml and rich, but
not ortools. This script, run where pip reaches a registry:

1. downloads ortools (by default the version installed here, so both machines run the same CP-SAT)
   and everything it needs, as cp312 manylinux wheels, into a cache folder (not carried);
2. checks offline that the cache is a complete install set for cp312 manylinux (``pip install
   --dry-run --no-index``), so a missing wheel fails here and not on the machine;
3. copies into the carried folder only the wheels the machine lacks (``DEVICE_HAS`` lists the ones
   its image holds in a version ortools accepts) and checks the folder fits ``--max-mib``.

Then, in the device call (the folder is git-ignored, so ``carry`` must name it)::

    run(carry=[".whl"], command=DEVICE_COMMAND)

where DEVICE_COMMAND, printed at the end, installs ortools from the carried wheels with no index and
runs benchmarks/calibration/gpu_calibrate.py (the card's cost profile) and benchmarks/gpu_check.py from
the source tree with ``PYTHONPATH=.``. docs/gpu.md has the details.

    python tools/device_wheels.py                  # download, check, fill .whl/
    python tools/device_wheels.py --offline        # check and fill from the cache only
    python tools/device_wheels.py --check DIR      # only check that DIR resolves ortools offline
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PYTHON_VERSION = "3.12"  # the GPU machine's python3
# manylinux tags its glibc accepts (pip matches each tag exactly; ortools ships manylinux_2_27/2_28)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# What ortools needs that the GPU machine's image already holds in an accepted version
# (numpy 2.5.2 >= 2.0.2; pandas with its own needs): not carried, they are the largest wheels.
DEVICE_HAS = frozenset({"numpy", "pandas", "python-dateutil", "tzdata", "pytz", "six"})
DEFAULT_MAX_MIB = 40  # the call carries at most 64 MiB with the working tree (about 5 MiB)


def _name(wheel: Path) -> str:
    """The normalised project name of a wheel file (``absl_py-2.5.1-...whl`` -> ``absl-py``)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-", 1)[0]).lower()


def _pip(*args: str, own_config: bool = True) -> subprocess.CompletedProcess:
    """pip with this user's configuration (its index), or none (``own_config=False``: no find-links
    from a config file can hide a wheel missing from the checked folder)."""
    env = dict(os.environ)
    if not own_config:
        env["PIP_CONFIG_FILE"] = os.devnull
        env = {k: v for k, v in env.items() if k == "PIP_CONFIG_FILE" or not k.startswith("PIP_")}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)


def _target_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def download(requirement: str, cache: Path) -> None:
    """Every wheel ``requirement`` needs on the GPU machine's Python and platform, into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    r = _pip("download", "--disable-pip-version-check", "-d", str(cache), *_target_args(), requirement)
    if r.returncode != 0:
        sys.exit(f"device_wheels: pip download {requirement} failed:\n{r.stdout}{r.stderr}")


def check(folder: Path, requirement: str) -> list[str]:
    """Resolve ``requirement`` from ``folder`` alone, offline, for the GPU machine's Python and platform.

    Returns what pip would install ("name-version"); exits with pip's message if the set is incomplete.
    The tags (cp312, manylinux) are checked; Requires-Python is not (pip's install compares it with the
    running Python, not ``--python-version``): ``download`` already chose wheels for Python 3.12.
    """
    with tempfile.TemporaryDirectory() as target:
        r = _pip(
            "install",
            "--disable-pip-version-check",
            "--dry-run",
            "--no-index",
            "--find-links",
            str(folder),
            "--target",
            target,
            "--ignore-installed",
            "--ignore-requires-python",
            *_target_args(),
            requirement,
            own_config=False,
        )
    if r.returncode != 0:
        sys.exit(
            f"device_wheels: {folder} does not hold a complete install set for {requirement} "
            f"(cp{PYTHON_VERSION.replace('.', '')} manylinux); pip says:\n{r.stdout}{r.stderr}"
        )
    m = re.search(r"Would install (.*)", r.stdout)
    return sorted(m.group(1).split()) if m else []


def fill(cache: Path, dest: Path, max_mib: float) -> list[Path]:
    """Copy into ``dest`` (emptied first) the cached wheels the GPU machine lacks; exit if over max_mib."""
    wheels = sorted(cache.glob("*.whl"))
    names = [_name(w) for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # pip on the machine would refuse two versions of one project
        sys.exit(f"device_wheels: {cache} holds several versions of {', '.join(twice)}; empty it and run again")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    carried = [w for w in wheels if _name(w) not in DEVICE_HAS]
    for w in carried:
        shutil.copy2(w, dest / w.name)
    mib = sum(w.stat().st_size for w in carried) / 2**20
    if mib > max_mib:
        sys.exit(
            f"device_wheels: {dest} holds {mib:.1f} MiB, over --max-mib {max_mib:g}; the device call "
            "carries at most 64 MiB with the working tree"
        )
    return carried


def device_command(dest: str, requirement: str) -> str:
    """The device call's command: install from the carried wheels with no index, then run the check.

    pip resolves ortools' needs against the machine's own packages (numpy, pandas) and the carried wheels.
    """
    return (
        f"python3 -m pip install -q --no-index --find-links {dest} '{requirement}' && "
        "PYTHONPATH=. python3 benchmarks/calibration/gpu_calibrate.py --out $OUT/gpu_check/profile.yaml && "
        "PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT/gpu_check"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", default=".whl", help="the folder the device call carries (default .whl)")
    parser.add_argument("--cache", default=".whl-cache", help="every downloaded wheel (default .whl-cache)")
    parser.add_argument("--ortools", help="ortools version (default: the one installed here)")
    parser.add_argument("--offline", action="store_true", help="use the cache as it is; download nothing")
    parser.add_argument(
        "--max-mib",
        type=float,
        default=DEFAULT_MAX_MIB,
        help=f"largest carried folder allowed, MiB (default {DEFAULT_MAX_MIB})",
    )
    parser.add_argument("--check", metavar="DIR", help="only check that DIR resolves ortools offline")
    args = parser.parse_args(argv)
    version = args.ortools
    if version is None:
        try:
            version = importlib.metadata.version("ortools")
        except importlib.metadata.PackageNotFoundError:
            parser.error("ortools is not installed here; name a version with --ortools")
    requirement = f"ortools=={version}"
    if args.check:
        for w in check(Path(args.check), requirement):
            print(w)
        return 0
    cache, dest = Path(args.cache), Path(args.dest)
    if not args.offline:
        download(requirement, cache)
    resolved = check(cache, requirement)
    carried = fill(cache, dest, args.max_mib)
    mib = sum(w.stat().st_size for w in carried) / 2**20
    print(f"resolved offline for cp{PYTHON_VERSION.replace('.', '')} manylinux: {' '.join(resolved)}")
    print(f"{dest}/: {len(carried)} wheels, {mib:.1f} MiB ({', '.join(w.name for w in carried)})")
    print('device call: carry=["' + str(dest) + '"], command:')
    print("  " + device_command(str(dest), requirement))
    return 0


if __name__ == "__main__":
    sys.exit(main())
