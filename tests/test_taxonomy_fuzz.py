"""Property-based fuzzing of the taxonomy loader: whatever a contributor writes, `ptcompile validate` answers
with located problems (path:line:col: field: message), never a traceback.

Valid taxonomy files are mutated (hypothesis): values of the wrong type, missing and unknown keys,
non-string and duplicate keys, duplicate records, unicode (U+2028, NUL, bidi, BOM, lone-surrogate escapes),
huge numbers and strings, .inf/.nan, deep nesting, wrong containers; then the YAML text itself is mutated
(lines duplicated or dropped, random bytes and YAML syntax inserted, truncation, tabs, tags, anchors and
aliases, several documents, invalid UTF-8). Each case goes through the real loader
(`KnowledgeBase._load_files` on a directory holding the file, the code `KnowledgeBase.load` runs first);
a sample goes through a whole-taxonomy `KnowledgeBase.load` with the mutated file in place of the original,
and when that load succeeds the method's script still compiles (or fails with a CompileError).

At least 10,000 cases per run (FUZZ_QUOTA, deterministic: derandomized). PTCOMPILE_FUZZ_SCALE=10 runs ten
times as many; PTCOMPILE_FUZZ_RANDOM=1 draws new cases each run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ptcompile.errors import CompileError, Problem, TaxonomyError, display_path
from ptcompile.knowledge_base import KnowledgeBase
from ptcompile.paths import taxonomy_dir, templates_dir
from ptcompile.yaml_source import parse_yaml_text

# Mutated YAML provokes parser warnings (reused anchors, ...) by the thousand; they are not findings.
pytestmark = pytest.mark.filterwarnings("ignore")

SCALE = float(os.environ.get("PTCOMPILE_FUZZ_SCALE", "1"))
# Cases per file kind (cheap kinds get more; a method file takes ~5x a dataset file to parse).
FUZZ_QUOTA = {"method": 1200, "model": 1500, "dataset": 2000, "peft": 1000, "papers": 900, "categories": 900, "training": 700, "bib": 1800}
WHOLE_TAXONOMY_CASES = 150
assert sum(FUZZ_QUOTA.values()) >= 10_000


def fuzz_settings(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=os.environ.get("PTCOMPILE_FUZZ_RANDOM") != "1",
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# --------------------------------------------------------------------------------------------------
# Seeds: valid files of each kind, small enough to parse fast (big list files are cut to a few records)
# --------------------------------------------------------------------------------------------------

FOLDERS = {"method": "methods", "model": "models", "dataset": "datasets", "peft": "peft", "papers": "papers"}


@functools.lru_cache(maxsize=None)
def seeds(kind: str) -> list[tuple[str, str, object]]:
    """(relative path, original text, parsed data) of valid files of `kind`."""
    root = taxonomy_dir()
    if kind in FOLDERS:
        paths = sorted((root / FOLDERS[kind]).glob("*.yaml"))
    elif kind == "bib":
        paths = sorted((root / "papers").glob("*.bib"))
    else:
        paths = [root / f"{kind}.yaml"]
    out = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        data = None
        if kind != "bib":
            doc, problems = parse_yaml_text(text, path, path.name)
            assert not problems and doc is not None
            data = doc.data
        out.append((str(path.relative_to(root)), text, data))
    return out


def trimmed(kind: str, data, draw) -> object:
    """A smaller valid document of the same kind: a few records of a big list file."""
    if kind == "papers":
        return {"papers": draw(st.lists(st.sampled_from(data["papers"]), min_size=1, max_size=3))}
    if kind == "categories":
        return {"categories": draw(st.lists(st.sampled_from(data["categories"]), min_size=1, max_size=4))}
    if kind == "training":
        families = [dict(f, hyperparameters=f["hyperparameters"][:2]) for f in data["families"]]
        return {
            "common": draw(st.lists(st.sampled_from(data["common"]), min_size=1, max_size=3)),
            "families": draw(st.lists(st.sampled_from(families), max_size=2)),
        }
    return data


# --------------------------------------------------------------------------------------------------
# Structure mutations (on the parsed data) and a small YAML emitter
# --------------------------------------------------------------------------------------------------

WEIRD_TEXT = [
    "",
    " ",
    "line\u2028separator",
    "para\u2029graph",
    "nul\x00byte",
    "bidi \u202eevil\u202c",
    "bom\ufeff",
    "tab\tand\rreturn\nnewline",
    "emoji \U0001f600 and \u0301 combining",
    '"quotes" and \'single\' and \\backslash',
    "{{ jinja }} {% if %} {# c #}",
    "</script><script>alert(1)</script>",
    "'''\nimport os\n'''",
    "- not: a list",
    "&anchor *alias !!tag",
    "rafailov2023direct",
    "dpo",
    "preference",
    "0.1",
    "2305.18290",
    "2023-05",
]
HUGE_NUMBERS = [10**100, -(10**40), 2**63, -(2**63) - 1, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan, 0, -1, 1, 0.0, -0.0]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WEIRD_TEXT),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20),
    st.sampled_from([301, 4001, 20_000]).map(lambda n: "x" * n),  # over the schema's limits, and huge
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none()), inner, max_size=4)), max_leaves=12)


def paths_of(data, limit: int = 400) -> list[tuple]:
    """Paths to the nodes of the document (the root first), breadth first, at most `limit`."""
    out, queue = [], [((), data)]
    while queue and len(out) < limit:
        prefix, node = queue.pop(0)
        out.append(prefix)
        if isinstance(node, dict):
            queue += [(prefix + (key,), value) for key, value in node.items()]
        elif isinstance(node, list):
            queue += [(prefix + (index,), value) for index, value in enumerate(node)]
    return out


def get(data, path):
    for part in path:
        data = data[part]
    return data


def put(data, path, value):
    if not path:
        return value
    get(data, path[:-1])[path[-1]] = value
    return data


def _copy(data):
    """A copy of the containers (iterative: documents may be thousands of levels deep)."""
    if not isinstance(data, (dict, list)):
        return data
    root = {} if isinstance(data, dict) else []
    stack = [(data, root)]
    while stack:
        source, target = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, value in items:
            if isinstance(value, (dict, list)):
                value_copy = {} if isinstance(value, dict) else []
                stack.append((value, value_copy))
            else:
                value_copy = value
            if isinstance(target, dict):
                target[key] = value_copy
            else:
                target.append(value_copy)
    return root


@st.composite
def mutate_structure(draw, data):
    data = _copy(data)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = draw(st.sampled_from(paths_of(data)))
        node = get(data, path)
        op = draw(st.sampled_from(["replace", "delete", "add_key", "duplicate", "nest", "wrap", "unwrap", "huge_list", "swap_container"]))
        if op == "replace":
            data = put(data, path, draw(values))
        elif op == "delete" and path:
            parent = get(data, path[:-1])
            del parent[path[-1]]
        elif op == "add_key" and isinstance(node, dict):
            node[draw(st.one_of(st.sampled_from(["summry", "id", "name", "default", "papers", "__class__"]), st.text(max_size=12), st.integers(), st.booleans(), st.none(), st.floats()))] = draw(values)
        elif op == "duplicate" and isinstance(node, list) and node:
            node.append(_copy(draw(st.sampled_from(node))))  # duplicate records: same id, key or name twice
        elif op == "nest":
            depth = draw(st.sampled_from([2, 10, 60, 400, 2, 10, 3000]))
            value = node
            for _ in range(depth):
                value = [value] if draw(st.booleans()) else {"k": value}
            data = put(data, path, value)
        elif op == "wrap":
            data = put(data, path, [node])
        elif op == "unwrap" and isinstance(node, (list, dict)) and node:
            data = put(data, path, node[0] if isinstance(node, list) else next(iter(node.values())))
        elif op == "huge_list":  # many items of a short scalar (a thousand copies of a record or of a 20 kB
            # string would make a 20 MB document, which only measures ruamel's memory appetite)
            small = not isinstance(node, (dict, list)) and len(str(node)) <= 64
            data = put(data, path, [node] * (draw(st.sampled_from([0, 2, 1000])) if small else 2))
        elif op == "swap_container":
            if isinstance(node, dict):
                data = put(data, path, [[k, v] for k, v in node.items()])
            elif isinstance(node, list):
                data = put(data, path, {str(i): v for i, v in enumerate(node)})
            else:
                data = put(data, path, {"value": node})
    return data


def scalar_yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    # JSON's escapes (\uXXXX, \n, \") are valid YAML double-quoted escapes; a lone surrogate stays escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def flow_yaml(value) -> str:
    parts, stack = [], [(value, False)]
    # iterative, so a 3000-deep document does not overflow the emitter
    while stack:
        item, closing = stack.pop()
        if closing:
            parts.append(item)
            continue
        if isinstance(item, dict):
            parts.append("{")
            stack.append(("}", True))
            entries = list(item.items())
            for i, (k, v) in enumerate(reversed(entries)):
                stack.append((v, False))
                stack.append((scalar_yaml(k) + ": ", True))
                if i < len(entries) - 1:
                    stack.append((", ", True))
        elif isinstance(item, list):
            parts.append("[")
            stack.append(("]", True))
            for i, v in enumerate(reversed(item)):
                stack.append((v, False))
                if i < len(item) - 1:
                    stack.append((", ", True))
        else:
            parts.append(scalar_yaml(item))
    return "".join(parts)


def block_yaml(value, indent: int = 0, depth: int = 0) -> str:
    """Block style for the first levels (as contributors write), flow style below."""
    pad = " " * indent
    if depth > 4 or not isinstance(value, (dict, list)) or not value:
        return pad + flow_yaml(value) + "\n"
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item and depth < 4:
                lines.append(f"{pad}{scalar_yaml(key)}:\n" + block_yaml(item, indent + 2, depth + 1))
            else:
                lines.append(f"{pad}{scalar_yaml(key)}: {flow_yaml(item)}\n")
    else:
        for item in value:
            if isinstance(item, dict) and item and depth < 4:
                inner = block_yaml(item, indent + 2, depth + 1)
                lines.append(pad + "- " + inner[indent + 2 :])
            else:
                lines.append(f"{pad}- {flow_yaml(item)}\n")
    return "".join(lines)


# --------------------------------------------------------------------------------------------------
# Text mutations (on the YAML or BibTeX text)
# --------------------------------------------------------------------------------------------------

SNIPPETS = [
    "\x00", "\u2028", "\u2029", "\ufeff", "\u202e", "\t", "\r", "\r\n", ":", ": ", "- ", "-", "#", "&a ", "*a", "*nope",
    "!!python/object/apply:os.system ['id']", "!tag ", "!!binary ", "!!str ", "!!int ", "!!float ", "!!set ", "!!omap ",
    "%YAML 1.1\n---\n", "\n---\n", "\n...\n", "? ", "? [a, b]\n: c\n", "{", "}", "[", "]", "'", '"', "\\", "|", ">",
    "<<: *a\n", "key: &a [*a]\n", "@", "`", "%", ",", "\n  - x\n", "\n    deeper: 1\n", "1e999", ".nan", ".inf", "0x1F",
    "0o17", "2023-05-29", "2023-05-29T10:00:00Z", "~", "null", "yes", "no", "on", "\xa0", "\x85", "\x7f", "\x1b[31m",
]
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


# The alias bomb is costly to refuse (the loader expands ~50,000 values first) and has its own test: rare here.
TEXT_OPS = ["dup_line", "drop_line", "insert", "insert", "insert_random", "truncate", "indent", "swap_lines", "prefix"] * 3 + ["bomb"]


@st.composite
def mutate_text(draw, text: str) -> bytes:
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        lines = text.split("\n")
        op = draw(st.sampled_from(TEXT_OPS))
        i = draw(st.integers(min_value=0, max_value=max(0, len(lines) - 1)))
        if op == "dup_line":  # duplicate keys, or duplicate list items
            lines.insert(i, lines[i])
        elif op == "drop_line":
            del lines[i]
        elif op == "swap_lines" and len(lines) > 1:
            j = draw(st.integers(min_value=0, max_value=len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent":
            lines[i] = draw(st.sampled_from(["  ", "\t", " ", ""])) + lines[i].lstrip(" " if draw(st.booleans()) else "")
        text = "\n".join(lines)
        if op in ("insert", "insert_random"):
            at = draw(st.integers(min_value=0, max_value=len(text)))
            snippet = draw(st.sampled_from(SNIPPETS)) if op == "insert" else draw(st.text(max_size=6))
            text = text[:at] + snippet + text[at:]
        elif op == "truncate":
            text = text[: draw(st.integers(min_value=0, max_value=len(text)))]
        elif op == "bomb":
            text = ALIAS_BOMB + text
        elif op == "prefix":
            text = draw(st.sampled_from(["\ufeff", "---\n", "%YAML 1.2\n---\n", "# comment\n", "[", "- ", "!!map\n"])) + text
    raw = text.encode("utf-8", errors="surrogatepass")
    if draw(st.integers(min_value=0, max_value=30)) == 0:  # invalid UTF-8
        at = draw(st.integers(min_value=0, max_value=len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe9t\xe9"])) + raw[at:]
    return raw


@st.composite
def mutated_file(draw, kind: str) -> tuple[str, bytes]:
    """(relative path, mutated file content) for one valid file of `kind`."""
    path, text, data = draw(st.sampled_from(seeds(kind)))
    if kind == "bib":
        entries = ["@" + entry.lstrip("@") for entry in text.split("\n@") if entry.strip()]
        text = "\n".join(draw(st.lists(st.sampled_from(entries), min_size=1, max_size=3)))  # repeats: duplicate keys
        return path, draw(mutate_text(text))
    small = trimmed(kind, data, draw)
    if small is not data:  # a few records of a big list file (parsing all of it every time would be slow)
        text = block_yaml(small)
    if draw(st.booleans()):
        text = block_yaml(draw(mutate_structure(small)))
    raw = draw(mutate_text(text))
    assert len(raw) < 2_000_000, "the generator made an unreasonably large document"
    return path, raw


# --------------------------------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------------------------------


def check_located(problems, shown: dict[str, int]) -> None:
    """Every problem is a Problem pointing at a known file, at a line of it, with a field and a message."""
    assert isinstance(problems, list)
    for problem in problems:
        assert isinstance(problem, Problem), problem
        location = problem.location
        assert location.path in shown, (location, shown)
        assert 1 <= location.line <= shown[location.path] + 1, (str(problem), shown[location.path])
        assert location.column >= 1, str(problem)
        assert isinstance(problem.field, str) and problem.field
        assert isinstance(problem.message, str) and problem.message.strip()
        assert len(problem.message) < 2000, f"unreadably long message: {problem.message[:200]}..."
    str(TaxonomyError(problems))  # renders


def line_count(raw: bytes) -> int:
    return raw.count(b"\n") + raw.count(b"\r") + raw.decode("utf-8", errors="replace").count("\u2028") + raw.count(b"\x85") + 2


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("kind", list(FUZZ_QUOTA))
def test_loader_reports_located_problems_for_any_mutation_of_a_file(kind, fuzz_root):
    executed = []

    @fuzz_settings(FUZZ_QUOTA[kind])
    @given(case=mutated_file(kind))
    def one_file(case):
        relative, raw = case
        root = fuzz_root / kind / "taxonomy"
        shutil.rmtree(root, ignore_errors=True)
        target = root / relative
        target.parent.mkdir(parents=True)
        target.write_bytes(raw)
        kb = KnowledgeBase(root.resolve(), templates_dir())
        problems = kb._load_files()  # never raises
        shown = {kb._shown(root / name): 1 for name in ("categories.yaml", "training.yaml")}  # "required file is missing"
        shown[kb._shown(target)] = line_count(raw)
        check_located(problems, shown)
        executed.append(1)

    one_file()
    assert len(executed) >= int(FUZZ_QUOTA[kind] * SCALE) * 0.95, f"only {len(executed)} cases ran"


class CachedParses:
    """Memoise parses of unchanged files, so a whole-taxonomy load costs one YAML parse (the mutated file)."""

    def __init__(self):
        import ptcompile.knowledge_base as knowledge_base

        self.module = knowledge_base
        self.original = knowledge_base.load_yaml
        self.original_bib = knowledge_base.parse_bibtex_file
        self.cache: dict = {}

    def load_yaml(self, path, shown):
        key = ("yaml", shown, path.read_bytes())
        if key not in self.cache:
            self.cache[key] = self.original(path, shown)
        return self.cache[key]

    def parse_bibtex_file(self, path, shown):
        key = ("bib", shown, path.read_bytes())
        if key not in self.cache:
            self.cache[key] = self.original_bib(path, shown)
        return self.cache[key]


def test_whole_taxonomy_load_with_one_mutated_file_reports_located_problems(tmp_path, monkeypatch):
    root = tmp_path / "taxonomy"
    shutil.copytree(taxonomy_dir(), root, ignore=shutil.ignore_patterns("_schema"))
    cached = CachedParses()
    monkeypatch.setattr(cached.module, "load_yaml", cached.load_yaml)
    monkeypatch.setattr(cached.module, "parse_bibtex_file", cached.parse_bibtex_file)
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    kinds = [k for k in FUZZ_QUOTA]
    outcomes = {"loaded": 0, "problems": 0, "compiled": 0}

    @fuzz_settings(WHOLE_TAXONOMY_CASES)
    @given(kind=st.sampled_from(kinds), data=st.data())
    def whole(kind, data):
        relative, raw = data.draw(mutated_file(kind))
        target = root / relative
        try:
            target.write_bytes(raw)
            shown = {display_path(path, root.resolve().parent): line_count(path.read_bytes()) for path in root.resolve().rglob("*") if path.is_file()}
            try:
                kb = KnowledgeBase.load(root, templates_dir())
            except TaxonomyError as error:
                outcomes["problems"] += 1
                check_located(error.problems, shown)
                return
            outcomes["loaded"] += 1
            if kind == "method":
                from ptcompile.recipe import resolve
                from ptcompile.render import render_script

                method_id = Path(relative).stem
                if method_id in kb.methods:
                    try:
                        render_script(resolve(kb, method_id))
                        outcomes["compiled"] += 1
                    except CompileError:
                        pass
        finally:
            target.write_bytes(files[target])

    whole()
    assert outcomes["problems"] > 0 and outcomes["loaded"] > 0, outcomes


def test_an_alias_bomb_is_refused_quickly():
    """'Billion laughs': nine aliases of nine aliases ... must not expand into 9**9 values."""
    import time

    started = time.perf_counter()
    doc, problems = parse_yaml_text(ALIAS_BOMB, Path("bomb.yaml"), "bomb.yaml")
    assert doc is None and problems and "aliases" in problems[0].message, problems
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("text", ["a: &x [1, *x]\n", "a: &x {b: *x}\n", "&x [*x]\n", "a: &x\n  b: *x\n"])
def test_a_self_referencing_alias_never_loops(text):
    doc, problems = parse_yaml_text(text, Path("loop.yaml"), "loop.yaml")
    assert (doc is None) == bool(problems)
    assert all(str(p).startswith("loop.yaml:1:") for p in problems), problems


@pytest.mark.parametrize(("text", "line"), [("a: 1\nb: !!float liu2021ptuning\n", 2), ("a:\n  - !!int id\n", 2), ("x: !!set 3\n", 1), ("x: !!timestamp never\n", 1)])
def test_a_value_the_yaml_library_cannot_build_is_located(text, line):
    """ruamel raises plain ValueError/AttributeError for these explicit tags; the loader locates them."""
    doc, problems = parse_yaml_text(text, Path("tags.yaml"), "tags.yaml")
    assert doc is None and len(problems) == 1, problems
    assert str(problems[0]).startswith(f"tags.yaml:{line}:"), problems
    assert "cannot build this value" in str(problems[0]) or "failed to construct" in str(problems[0]), problems
