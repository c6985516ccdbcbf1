"""Render a Recipe through the Jinja templates into Python source, and gate what comes out.

Safety rules (DESIGN.md): contributor strings never become code. A taxonomy value reaches a template only
through one of the filters below:

- `lit`      a Python literal (repr of str/int/bool/None; floats must be finite);
- `doc`      text for inside a docstring: one line, backslashes and quotes escaped, invisible characters escaped;
- `comment`  text for a `#` comment: one line, invisible characters escaped;
- `wrapdoc`  `doc`, wrapped to a width and indented.

The environment uses StrictUndefined (a misspelt variable is an error, not an empty string) and autoescape is
off because the output is Python, not HTML: escaping is the filters' job. The rendered source must parse.
"""

from __future__ import annotations

import ast
import functools
import math
import textwrap
import unicodedata
from pathlib import Path
from typing import Any

import jinja2

from .errors import CompileError
from .paths import templates_dir
from .recipe import Recipe

_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _escape_invisible(text: str) -> str:
    out = []
    for ch in text:
        if unicodedata.category(ch) in _INVISIBLE:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"))
        else:
            out.append(ch)
    return "".join(out)


def one_line(value: Any) -> str:
    """Collapse every kind of line break and run of whitespace (incl. U+2028/U+2029, \\r, \\f) to one space."""
    return " ".join(str(value).split())


def lit(value: Any) -> str:
    """A Python literal for a taxonomy value; the only way a value enters code."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CompileError(f"refusing to emit a non-finite float {value!r}")
        return repr(value)
    if isinstance(value, str):
        # repr() escapes quotes, backslashes, newlines and non-printable characters (U+2028 included).
        return repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(lit(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    raise CompileError(f"cannot emit a value of type {type(value).__name__} as a literal")


def doc(value: Any) -> str:
    """Text safe inside a regular (non-raw) triple-quoted docstring."""
    text = one_line(value).replace("\\", "\\\\").replace('"', '\\"')
    return _escape_invisible(text)


def comment(value: Any) -> str:
    """Text safe after `#` on one line."""
    return _escape_invisible(one_line(value))


def wrapdoc(value: Any, width: int = 100, indent: int = 0) -> str:
    pad = " " * indent
    lines = textwrap.wrap(one_line(value), width=width - indent, break_long_words=False, break_on_hyphens=False)
    return "\n".join(pad + doc(line) for line in lines) if lines else ""


def wrapcomment(value: Any, width: int = 100, indent: int = 0) -> str:
    pad = " " * indent
    lines = textwrap.wrap(one_line(value), width=width - indent - 2, break_long_words=False, break_on_hyphens=False)
    return "\n".join(f"{pad}# {comment(line)}" for line in lines)


def make_environment(root: Path | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root or templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(lit=lit, doc=doc, comment=comment, wrapdoc=wrapdoc, wrapcomment=wrapcomment)
    return env


@functools.lru_cache(maxsize=8)
def _cached_environment(root: Path) -> jinja2.Environment:
    """One environment per template directory, so each template is compiled once per process (not once per
    script: `ptcompile build` renders every method). Jinja's auto_reload still picks up edited templates."""
    return make_environment(root)


def render_script(recipe: Recipe, templates: Path | None = None, script_name: str | None = None) -> str:
    from .runtime_args import CHUNKED_LOSS_FAMILIES, PLAIN_HEAD_MODEL_TYPES, TINY_DIR, runtime_groups

    env = _cached_environment(Path(templates or templates_dir()).resolve())
    name = f"{recipe.family}/script.py.j2"
    try:
        template = env.get_template(name)
    except jinja2.TemplateNotFound:
        raise CompileError(f"no template {name} for family '{recipe.family}'") from None
    source = template.render(
        recipe=recipe,
        runtime_groups=lambda: runtime_groups(recipe),
        script_name=script_name or default_script_name(recipe),
        tiny_dir=TINY_DIR,
        chunked_head=recipe.family in CHUNKED_LOSS_FAMILIES,  # the family's script includes common/chunked_logps.py.j2
        plain_head_model_types=PLAIN_HEAD_MODEL_TYPES,
    )
    source = tidy(source)
    check_source(source, f"{recipe.method.id} x {recipe.model.id}")
    return source


def default_script_name(recipe: Recipe) -> str:
    return f"train_{recipe.method.id.replace('-', '_').replace('.', '_')}.py"


def tidy(source: str) -> str:
    """Collapse runs of 3+ blank lines left by conditional template blocks and strip trailing spaces."""
    lines = [line.rstrip() for line in source.splitlines()]
    out: list[str] = []
    blanks = 0
    for line in lines:
        blanks = blanks + 1 if not line else 0
        if blanks <= 2:
            out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def check_source(source: str, what: str) -> ast.Module:
    """The safety gate: the emitted script must be valid Python. (tests/test_safety.py proves more.)"""
    try:
        tree = ast.parse(source)
        compile(tree, what, "exec")
    except SyntaxError as exc:
        context = source.splitlines()[max(0, (exc.lineno or 1) - 3) : (exc.lineno or 1) + 2]
        raise CompileError(f"internal error: the script for {what} does not parse: {exc}\n" + "\n".join(context)) from None
    return tree


def strip_docstring(source: str) -> str:
    """The script without its module docstring (which names the method, papers and command)."""
    tree = ast.parse(source)
    first = tree.body[0] if tree.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return "\n".join(source.splitlines()[first.end_lineno :]).lstrip("\n") + "\n"
    return source
