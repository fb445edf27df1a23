"""Reading YAML a user hands us (plan files, model specs) without its traps: no anchors or aliases (an
alias bomb), no deep flow nesting (PyYAML's scan is quadratic in depth)."""

from __future__ import annotations

import re
from typing import Any

import yaml


class NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases: ckptplan never writes them, and a few hundred bytes of nested
    aliases (an alias bomb) expand into billions of rows once read as plain lists."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None) is not None:
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed in a plan file", mark
            )
        return super().compose_node(parent, index)


MAX_FLOW_DEPTH = 16  # a plan nests [ ] three deep (an op row's shapes); PyYAML's scan is quadratic in depth


def flow_depth(text: str) -> int:
    """How deep ``[`` and ``{`` nest outside double-quoted strings (where a plan puts any text)."""
    depth = deepest = 0
    for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"|[\[\]{}]', text):
        c = m.group()
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
    return deepest
