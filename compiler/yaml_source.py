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
from ruamel.yaml.constructor import ConstructorError, RoundTripConstructor
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


MAX_VALUES = 50_000
"""More values than any taxonomy file needs; YAML aliases can make a few lines expand to billions."""


class _Unplainable(Exception):
    """A document that cannot become plain data: aliases expanding too far, or an alias inside itself."""


def _plain(node: Any, path: PathKey, doc: YamlDocument, state: dict | None = None) -> Any:
    state = state if state is not None else {"values": 0, "open": set()}
    state["values"] += 1
    if state["values"] > MAX_VALUES:
        raise _Unplainable(f"the document expands to more than {MAX_VALUES} values (through aliases?)")
    if isinstance(node, (CommentedMap, CommentedSeq)):
        if id(node) in state["open"]:
            raise _Unplainable("an alias refers to a node that contains it (a recursive structure)")
        state["open"].add(id(node))
        try:
            return _plain_container(node, path, doc, state)
        finally:
            state["open"].discard(id(node))
    return _plain_scalar(node)


def _plain_container(node: Any, path: PathKey, doc: YamlDocument, state: dict) -> Any:
    if isinstance(node, CommentedMap):
        out: dict[Any, Any] = {}
        for key in node:
            kline, kcol = node.lc.key(key)
            vline, vcol = node.lc.value(key)
            doc.key_positions[path + (key,)] = (kline, kcol)
            doc.value_positions[path + (key,)] = (vline, vcol)
            out[_plain_scalar(key)] = _plain(node[key], path + (key,), doc, state)
        return out
    items = []
    for index, item in enumerate(node):
        line, col = node.lc.item(index)
        doc.value_positions[path + (index,)] = (line, col)
        items.append(_plain(item, path + (index,), doc, state))
    return items


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


class _LocatingConstructor(RoundTripConstructor):
    """ruamel's round-trip constructor, except that a value it fails to build (e.g. `!!float abc`, `!!set` on
    a scalar: plain ValueError/AttributeError inside ruamel) becomes a ConstructorError at that node."""

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (MarkedYAMLError, RecursionError):
            raise
        except Exception as exc:
            raise ConstructorError(None, None, f"cannot build this value ({type(exc).__name__}: {exc})", node.start_mark) from None


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.Constructor = _LocatingConstructor
    yaml.allow_duplicate_keys = False
    return yaml


def _brief(text: str, limit: int = 300) -> str:
    """One line of at most `limit` characters (ruamel quotes whole values, e.g. a duplicate key's list)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def load_yaml(path: Path, shown_path: str) -> tuple[YamlDocument | None, list[Problem]]:
    """Parse one YAML file; on a syntax error return the located problem instead of raising."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return None, [Problem(Location(shown_path, 1, 1), "-", f"not valid UTF-8: {exc.reason}")]
    return parse_yaml_text(text, path, shown_path)


def _expanded_size(root: Any, limit: int) -> int:
    """How many values a composed YAML node graph holds once its aliases are expanded (counting stops past
    `limit`). Shared nodes are counted once per reference but computed once, so nine lines of nested
    aliases ("billion laughs") are measured in microseconds instead of being expanded."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        value = getattr(node, "value", None)
        children = [part for pair in value for part in pair] if isinstance(value, list) and value and isinstance(value[0], tuple) else value if isinstance(value, list) else []
        if not children_done:
            if key in visiting:  # an alias inside its own anchor: count it once
                continue
            visiting.add(key)
            stack.append((node, True))
            stack += [(child, False) for child in children if id(child) not in sizes]
        else:
            visiting.discard(key)
            sizes[key] = min(limit + 1, 1 + sum(sizes.get(id(child), 0) for child in children))
    return sizes.get(id(root), 0)


def parse_yaml_text(text: str, path: Path, shown_path: str) -> tuple[YamlDocument | None, list[Problem]]:
    doc = YamlDocument(path=path, shown_path=shown_path, data=None)
    try:
        if "*" in text:  # aliases are possible: measure before building (ruamel's messages expand them too)
            composed = _yaml().compose(text)
            if composed is not None and _expanded_size(composed, MAX_VALUES) > MAX_VALUES:
                return None, [Problem(Location(shown_path, 1, 1), "-", f"YAML error: the document expands to more than {MAX_VALUES} values (through aliases?)")]
        raw = _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        message = _brief(" ".join(str(part) for part in (exc.context, exc.problem) if part))
        if "duplicate key" in message or type(exc).__name__ == "DuplicateKeyError":
            message = "duplicate key: " + message
        return None, [Problem(Location(shown_path, line, col), "-", f"YAML error: {message}")]
    except YAMLError as exc:
        return None, [Problem(Location(shown_path, 1, 1), "-", f"YAML error: {_brief(str(exc))}")]
    except RecursionError:
        return None, [Problem(Location(shown_path, 1, 1), "-", "YAML error: nesting too deep")]
    except Exception as exc:  # a parser bug on hostile input must still be a located problem, not a traceback
        return None, [Problem(Location(shown_path, 1, 1), "-", f"YAML error: the parser failed ({type(exc).__name__}: {_brief(str(exc))})")]
    try:
        doc.data = _plain(raw, (), doc)
    except _Unplainable as exc:
        return None, [Problem(Location(shown_path, 1, 1), "-", f"YAML error: {exc}")]
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
