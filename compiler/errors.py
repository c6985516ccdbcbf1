"""Located errors: every problem a contributor can cause points at a file, a line, a column and a field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, order=True)
class Location:
    path: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    location: Location
    field: str  # dotted path inside the file, e.g. "hyperparameters[2].default"; "-" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.field}: {self.message}"


class TaxonomyError(Exception):
    """One or more located problems in the taxonomy; str() lists them one per line."""

    def __init__(self, problems: list[Problem], stage: str = "references"):
        self.problems = sorted(problems, key=lambda p: (p.location, p.field))
        self.stage = stage  # "files" (syntax and schema) or "references" (between files)
        super().__init__("\n".join(str(p) for p in self.problems))


class CompileError(Exception):
    """A request the compiler cannot honour (unknown method, bad --set value, ...)."""


def display_path(path: Path, root: Path | None = None) -> str:
    """Show paths relative to the working directory (or the taxonomy's parent) when possible."""
    path = path.resolve()
    for base in (Path.cwd(), root):
        if base is None:
            continue
        try:
            return str(path.relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)
