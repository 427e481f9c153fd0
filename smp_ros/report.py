"""A benchmark's or probe's report, written one way by every such command (``bench-ingest``,
``executor-bench``, ``sim-bench``, ``can-bench``, ``gate-probe``): a fixed-width table for the
terminal and the numbers as JSON. Imports nothing of the package, so every part may use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Column:
    """One table column: ``title`` over the values ``row[key]`` formatted with ``fmt`` (a format spec
    such as ``.2f``) in ``width`` characters, right-aligned unless ``left``; ``sep`` precedes it."""

    title: str
    key: str
    width: int
    fmt: str = ""
    left: bool = False
    sep: str = ""

    def cell(self, value: Any, spec: str) -> str:
        return f"{self.sep}{value:{'<' if self.left else '>'}{self.width}{spec}}"


def format_table(columns: Sequence[Column], rows: Iterable[Mapping[str, Any]]) -> str:
    """The header line, then one line per row."""
    lines = ["".join(c.cell(c.title, "") for c in columns)]
    lines += ["".join(c.cell(row[c.key], c.fmt) for c in columns) for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: Any, indent: int = 2) -> Path:
    """``data`` as JSON at ``path`` (parent folders created); says where on stdout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent))
    print(f"wrote {path}")
    return path
