"""Read YAML 1.2 with ruamel.yaml and remember where every value came from.

PyYAML reads `5e-7` as a string, `yes` as True and silently keeps the last of two duplicate keys; ruamel's
YAML 1.2 loader does none of that. We convert its round-trip nodes into plain Python values (so pydantic's
strict mode sees real bool/int/float/str) and keep a map from each value's path to its line and column.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from .errors import Location, Problem

PathKey = tuple[Any, ...]


@dataclass
class YamlDocument:
    path: Path
    shown_path: str
    data: Any
    value_positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)  # 0-based line, col
    key_positions: dict[PathKey, tuple[int, int]] = field(default_factory=dict)

    def location(self, loc: PathKey, prefer_key: bool = False) -> Location:
        """The position of the deepest known node on `loc` (a missing field points at its parent)."""
        for end in range(len(loc), -1, -1):
            prefix = tuple(loc[:end])
            table = (self.key_positions, self.value_positions) if prefer_key else (self.value_positions,)
            for positions in table:
                if prefix in positions:
                    line, col = positions[prefix]
                    return Location(self.shown_path, line + 1, col + 1)
        return Location(self.shown_path, 1, 1)


def _plain(node: Any, path: PathKey, doc: YamlDocument) -> Any:
    if isinstance(node, CommentedMap):
        out: dict[Any, Any] = {}
        for key in node:
            kline, kcol = node.lc.key(key)
            vline, vcol = node.lc.value(key)
            doc.key_positions[path + (key,)] = (kline, kcol)
            doc.value_positions[path + (key,)] = (vline, vcol)
            out[_plain_scalar(key)] = _plain(node[key], path + (key,), doc)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for index, item in enumerate(node):
            line, col = node.lc.item(index)
            doc.value_positions[path + (index,)] = (line, col)
            items.append(_plain(item, path + (index,), doc))
        return items
    return _plain_scalar(node)


def _plain_scalar(value: Any) -> Any:
    # ruamel wraps scalars in subclasses (ScalarFloat, ScalarBoolean, LiteralScalarString, ...)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        # A date such as 2023-05-29 is a timestamp in YAML; keep the type so strict validation names it.
        return value
    return value


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def load_yaml(path: Path, shown_path: str) -> tuple[YamlDocument | None, list[Problem]]:
    """Parse one YAML file; on a syntax error return the located problem instead of raising."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return None, [Problem(Location(shown_path, 1, 1), "-", f"not valid UTF-8: {exc.reason}")]
    return parse_yaml_text(text, path, shown_path)


def parse_yaml_text(text: str, path: Path, shown_path: str) -> tuple[YamlDocument | None, list[Problem]]:
    doc = YamlDocument(path=path, shown_path=shown_path, data=None)
    try:
        raw = _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        message = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        message = " ".join(message.split())
        if "duplicate key" in message or type(exc).__name__ == "DuplicateKeyError":
            message = "duplicate key: " + message
        return None, [Problem(Location(shown_path, line, col), "-", f"YAML error: {message}")]
    except YAMLError as exc:
        return None, [Problem(Location(shown_path, 1, 1), "-", f"YAML error: {' '.join(str(exc).split())}")]
    except RecursionError:
        return None, [Problem(Location(shown_path, 1, 1), "-", "YAML error: nesting too deep")]
    try:
        doc.data = _plain(raw, (), doc)
    except RecursionError:
        return None, [Problem(Location(shown_path, 1, 1), "-", "YAML error: nesting too deep")]
    except TypeError as exc:  # e.g. an unhashable (mapping) key
        return None, [Problem(Location(shown_path, 1, 1), "-", f"YAML error: {exc}")]
    return doc, []


def format_loc(loc: PathKey) -> str:
    """('hyperparameters', 2, 'default') -> 'hyperparameters[2].default'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "-"
