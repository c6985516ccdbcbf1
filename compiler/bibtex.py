"""Read BibTeX with bibtexparser 2.x, turning its silent failures into located errors.

bibtexparser 2 never raises: a broken block or a repeated key lands in `library.failed_blocks`, and its
line numbers are 0-based. We report both as errors with 1-based lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import bibtexparser
from bibtexparser.model import DuplicateBlockKeyBlock

from .errors import Location, Problem


@dataclass(frozen=True)
class BibEntry:
    key: str
    entry_type: str
    fields: dict[str, str]
    raw: str
    location: Location


def parse_bibtex(text: str, shown_path: str) -> tuple[dict[str, BibEntry], list[Problem]]:
    library = bibtexparser.parse_string(text)
    problems: list[Problem] = []
    entries: dict[str, BibEntry] = {}
    for block in library.failed_blocks:
        where = Location(shown_path, block.start_line + 1, 1)
        if isinstance(block, DuplicateBlockKeyBlock):
            problems.append(Problem(where, block.key, "duplicate BibTeX key"))
        else:
            reason = " ".join(str(getattr(block, "error", "unparseable block")).split()) or "unparseable block"
            problems.append(Problem(where, "-", f"BibTeX block could not be parsed: {reason}"))
    for entry in library.entries:
        where = Location(shown_path, entry.start_line + 1, 1)
        fields = {name: str(f.value) for name, f in entry.fields_dict.items()}
        if entry.key in entries:
            problems.append(Problem(where, entry.key, "duplicate BibTeX key"))
            continue
        for required in ("title", "year"):
            if not fields.get(required, "").strip():
                problems.append(Problem(where, f"{entry.key}.{required}", "required BibTeX field is missing"))
        entries[entry.key] = BibEntry(entry.key, entry.entry_type.lower(), fields, entry.raw.strip(), where)
    return entries, problems


def parse_bibtex_file(path: Path, shown_path: str) -> tuple[dict[str, BibEntry], list[Problem]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return {}, [Problem(Location(shown_path, 1, 1), "-", f"not valid UTF-8: {exc.reason}")]
    return parse_bibtex(text, shown_path)
