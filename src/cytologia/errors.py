"""Errors for bad input: each names the file and, where there is one, the row."""

from __future__ import annotations

from pathlib import Path


class CytologiaInputError(ValueError):
    """Bad user input (a table, an image, a checkpoint). The message says where."""


class ValidationError(CytologiaInputError):
    """A table broke the data contract. ``problems`` lists (row, message); rows are 1-based data rows
    (row 1 is the line after the header)."""

    def __init__(self, path: str | Path, problems: list[tuple[int | None, str]], total: int | None = None):
        self.path = str(path)
        self.problems = problems
        total = len(problems) if total is None else total
        shown = "\n".join(f"  {self.path}" + (f", row {r}" if r is not None else "") + f": {m}" for r, m in problems)
        more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
        super().__init__(f"{self.path}: {total} problem(s)\n{shown}{more}")
