"""``ckptplan``: a thin typer CLI over the library. Human output goes to stderr, ``--json`` to stdout.

Exit codes: 0 ok, 2 usage or bad input (a budget, option, model spec, plan file, a model whose step fails
to run or calls sys.exit, a factory argument `fit --vary` names that the factory lacks, or an option whose
optional dependency is not installed), 3 infeasible budget (for `fit`: nothing fits even at --start), 4 time
limit with no feasible plan, 5 plan does not match the model, 6 `verify` measured a peak above the budget, 7 an
output file (`-o`, `--plot`) cannot be written (a directory, under a file, not writable, disk full), 8 the
server (--server) could not be reached or failed, 130 interrupted (Ctrl-C; nothing written).
"""

from __future__ import annotations

# NOTE [ Lazy package ]: building this app imports neither torch nor OR-Tools (tests/test_cli_fast.py), so
# `--help` answers at once; each command imports what it needs in its body.
from .common import app
from .examine import diff, explain, show, trace_cmd
from .planning import fit_cmd, solve, sweep
from .run import serve, verify

# the commands in the order --help lists them: plan, inspect, run
for _name, _command in (
    ("solve", solve),
    ("sweep", sweep),
    ("fit", fit_cmd),
    ("trace", trace_cmd),
    ("explain", explain),
    ("show", show),
    ("diff", diff),
    ("verify", verify),
    ("serve", serve),
):
    app.command(_name)(_command)

__all__ = ["app", "main"]


def main() -> None:
    app()
