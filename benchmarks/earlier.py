"""An earlier benchmark run read back to be counted or priced again by the present code (``--refit``,
``--reprice``): its measurements kept, what the code derives from them redone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def load_again(path: str, option: str, script: str, verb: str, redo: Callable[[list[dict]], None]) -> dict[str, Any]:
    """The JSON ``script`` wrote at ``path``, with ``redo`` applied to its ``results`` in place; a
    SystemExit naming the file and the option when this code cannot redo it."""
    name = script.removesuffix(".py") + ".json"
    try:
        run = json.loads(Path(path).read_text())
        redo(run["results"])
        return run
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise SystemExit(f"{option} {path}: this code cannot {verb} it again ({type(e).__name__}: {e}); "
                         f"give it the {name} a run of {script} wrote") from None
