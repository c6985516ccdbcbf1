"""The reference site's pages, generated from the knowledge base (mkdocs-material renders them).

`write_site(kb, site_dir)` writes site_dir/docs: a home page with the taxonomy tree, a guide ('which method
should I use?') derived from the records, a page per method, category, model preset and PEFT technique, the
paper index (filterable, BibTeX per paper), a hyperparameter index and the dataset presets, plus the static
assets (vendored KaTeX, the site's own script and style) and docs/_nav.json, the navigation site/hooks.py gives
to mkdocs.

Safety: every string that comes from the taxonomy is escaped before it lands on a page.

- `md(text)`   inline text for Markdown *and* raw HTML: `<`, `>`, `&` become entities, and so does every character
               the enabled Markdown extensions read as inline syntax (`[`, `]`, `*`, `_`, backtick, backslash,
               `{`, `}`, `|`) and the first character unless it is a letter (block syntax such as `#`, `-`, `1.`,
               `!!!` only counts at the start of a line). The text then renders as itself: `<script>` shows as
               text, `[x](javascript:...)` is not a link, `{: onclick=...}` adds no attribute, `|` does not split
               a table cell. Control and invisible characters (bidi overrides, U+2028, the \\x02/\\x03
               Markdown uses for its own placeholders) are shown as visible escapes such as `\\u202e`.
- `attr(text)` a value inside a double-quoted HTML attribute.
- `code(text)` inline code: `<code>` + md(text), safe inside a table cell.
- `fence(code)` a fenced code block whose fence is longer than any run of backticks inside it.
- `title_meta(text)` the page title for the front matter: the theme prints it without escaping, so it gets
               HTML entities here (and is JSON-quoted, which YAML reads).
External links come only from schema-validated http(s) URLs and are written as `<a href>` with attr().
"""

from __future__ import annotations

import html
import json
import posixpath
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

from . import schema
from .knowledge_base import FAMILY_FORMATS, KnowledgeBase
from .recipe import resolve
from .render import _escape_invisible, default_script_name, one_line, render_script
from .runtime_args import FORMAT_FIELDS

# ---------------------------------------------------------------------------------------------------------
# Escaping
# ---------------------------------------------------------------------------------------------------------

_HTML = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
# Inline syntax of the enabled Markdown extensions: backslash escapes, code spans, emphasis, links and images
# (no `[`, no link), attribute lists (`{...}`), table cells (`|`). Block syntax (`#`, `-`, `1.`, `>`, `!!!`,
# `???`, indentation) only counts at the start of a line, so the first character is encoded whatever it is.
_MD_SYNTAX = "\\`*_{}[]|"
_ENTITIES = str.maketrans({**{c: f"&#{ord(c)};" for c in _MD_SYNTAX}, **_HTML})


def _shown(text: str) -> str:
    """`_escape_invisible` (the script renderer's), skipped for the common all-printable text (fast path)."""
    return text if text.isprintable() else _escape_invisible(text)


def _visible(text: object) -> str:
    return _shown(one_line(text))


def md(text: object) -> str:
    """Taxonomy text as inline Markdown/HTML that renders exactly as the text (see the module docstring)."""
    text = _visible(text)
    if not text:
        return text
    head = text[0]
    return (head.translate(_ENTITIES) if head in _HTML or head.isalpha() else f"&#{ord(head)};") + text[1:].translate(_ENTITIES)


def attr(text: object) -> str:
    return html.escape(_visible(text), quote=True)


def code(text: object) -> str:
    return f"<code>{md(text)}</code>"


def fence(body: str, language: str = "python") -> str:
    body = "\n".join(_shown(line) for line in body.rstrip().splitlines())
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", body)), default=0) + 1)
    return f"{ticks}{language}\n{body}\n{ticks}"


def pre(body: str, language: str = "text") -> str:
    """A code block as raw HTML (for use inside raw HTML blocks); the theme adds its copy button."""
    lines = "\n".join(html.escape(_shown(line), quote=False) for line in body.rstrip().splitlines())
    return f'<pre><code class="language-{attr(language)}">{lines}</code></pre>'


_BUILTINS = frozenset(dir(__import__("builtins")))


def highlight_python(source: str) -> str:
    """Python source as the theme's highlighted code block, with Pygments' short token classes.

    The long generated scripts are highlighted here with the standard library's tokenizer (several times faster
    than Pygments) and put into the built page by site/hooks.py after the search index has been made (they are
    not searchable text, and the search plugin's HTML parser is the slowest step of the build otherwise).
    Text that does not tokenize is shown unhighlighted.
    """
    import io
    import keyword
    import tokenize

    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    out: list[str] = []
    pos = 0
    previous = ""
    statement_start = True
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        tokens = []
        out.append(html.escape(source, quote=False))
        pos = len(source)
    for tok in tokens:
        if tok.type == tokenize.ENDMARKER:
            break
        begin = starts[tok.start[0] - 1] + tok.start[1]
        end = starts[tok.end[0] - 1] + tok.end[1]
        if begin > pos:
            out.append(html.escape(source[pos:begin], quote=False))
        text = source[begin:end]
        cls = ""
        if tok.type == tokenize.NAME:
            if keyword.iskeyword(tok.string):
                cls = "kc" if tok.string in ("True", "False", "None") else "k"
            elif previous == "def":
                cls = "nf"
            elif previous == "class":
                cls = "nc"
            elif previous == "@":
                cls = "nd"
            elif tok.string in _BUILTINS:
                cls = "nb"
        elif tok.type == tokenize.STRING:
            cls = "sd" if statement_start and text.lstrip("rRbBuU").startswith(('"""', "'''")) else "s2"
        elif tok.type == tokenize.NUMBER:
            cls = "m"
        elif tok.type == tokenize.COMMENT:
            cls = "c1"
        elif tok.type == tokenize.OP:
            cls = "o" if tok.string not in "()[]{},:.;" else "p"
        escaped = html.escape(text, quote=False)
        out.append(f'<span class="{cls}">{escaped}</span>' if cls and text else escaped)
        pos = max(pos, end)
        if tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            statement_start = tok.type == tokenize.NEWLINE
            if tok.type != tokenize.NEWLINE:
                previous = tok.string
    if pos < len(source):
        out.append(html.escape(source[pos:], quote=False))
    body = _escape_invisible_keep_lines("".join(out))
    return f'<div class="language-python highlight"><pre><span></span><code>{body}</code></pre></div>'


def _escape_invisible_keep_lines(text: str) -> str:
    """Control and bidi characters shown as escapes (no Trojan-Source look-alikes); newlines and tabs kept."""
    return "\n".join("\t".join(_shown(part) for part in line.split("\t")) for line in text.split("\n"))


def title_meta(text: object) -> str:
    return json.dumps(html.escape(_visible(text), quote=True))


def external(url: str, label: object) -> str:
    """A link to another site. Only http(s) URLs pass (the schema validates them; this is a second guard)."""
    if not re.match(r"^https?://[^\s<>\"']+$", url):
        return md(label)
    return f'<a href="{attr(url)}">{md(label)}</a>'


def front_matter(title: str, boost: float | None = None) -> list[str]:
    """YAML front matter: the (escaped) page title, and a search boost so that a method's own page ranks above
    the pages that merely mention it."""
    lines = ["---", f"title: {title_meta(title)}"]
    if boost is not None:
        lines += ["search:", f"  boost: {boost}"]
    return lines + ["---", ""]


# ---------------------------------------------------------------------------------------------------------
# Paths: pages are docs-relative .md paths; links between them are Markdown links (checked by mkdocs) or, in
# raw HTML, the URL mkdocs gives the page with use_directory_urls (computed by `href`).
# ---------------------------------------------------------------------------------------------------------


def method_path(method_id: str) -> str:
    return f"methods/{method_id}.md"


def category_path(category_id: str) -> str:
    return f"categories/{category_id}.md"


def model_path(model_id: str) -> str:
    return f"models/{model_id}.md"


def peft_path(peft_id: str) -> str:
    return f"peft/{peft_id}.md"


PAPERS = "papers.md"
GUIDE = "guide.md"
HYPERPARAMETERS = "hyperparameters.md"
DATASETS = "datasets.md"


def rel(from_page: str, to_page: str) -> str:
    """Markdown link target from one page to another (mkdocs validates and rewrites these)."""
    target, _, anchor = to_page.partition("#")
    path = posixpath.relpath(target, posixpath.dirname(from_page) or ".")
    return path + (f"#{anchor}" if anchor else "")


def _url_dir(page: str) -> str:
    if page == "index.md":
        return ""
    if page.endswith("/index.md"):
        return page[: -len("index.md")]
    return page[: -len(".md")] + "/"


def href(from_page: str, to_page: str) -> str:
    """The relative URL of `to_page` as seen from `from_page` in the built site (directory URLs)."""
    target, _, anchor = to_page.partition("#")
    start = _url_dir(from_page) or "."
    dest = _url_dir(target) if target.endswith(".md") else target
    path = posixpath.relpath(dest or ".", start)
    if target.endswith(".md"):
        path = "./" if path == "." else path + "/"
    return attr(path + (f"#{anchor}" if anchor else ""))


def link(from_page: str, to_page: str, label: object) -> str:
    return f"[{md(label)}]({rel(from_page, to_page)})"


# ---------------------------------------------------------------------------------------------------------
# Views of the knowledge base
# ---------------------------------------------------------------------------------------------------------


class Catalogue:
    """Indexes over the knowledge base that several pages need."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        self.category_order = list(kb.categories)
        self.children: dict[str | None, list[str]] = defaultdict(list)
        for cid, entry in kb.categories.items():
            self.children[entry.record.parent].append(cid)
        self.methods_by_category: dict[str, list[str]] = defaultdict(list)
        for mid in sorted(kb.methods, key=lambda m: kb.methods[m].record.name.lower()):
            self.methods_by_category[kb.methods[mid].record.category].append(mid)
        self.papers_by_category: dict[str, list[str]] = defaultdict(list)
        for key in self.papers_sorted():
            for cid in kb.papers[key].record.categories:
                self.papers_by_category[cid].append(key)
        self.cited_by: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for mid, entry in sorted(kb.methods.items()):
            for key in entry.record.papers:
                self.cited_by[key].append((method_path(mid), entry.record.name))
        for pid, entry in sorted(kb.peft.items()):
            for key in entry.record.papers:
                self.cited_by[key].append((peft_path(pid), entry.record.name))
        for mid, entry in sorted(kb.models.items()):
            for key in entry.record.papers:
                self.cited_by[key].append((model_path(mid), entry.record.name))
        for did, entry in sorted(kb.datasets.items()):
            for key in entry.record.papers:
                self.cited_by[key].append((f"{DATASETS}#dataset-{did}", entry.record.name))

    def papers_sorted(self) -> list[str]:
        return sorted(self.kb.papers, key=lambda k: (self.kb.papers[k].record.date or "0000", k), reverse=True)

    def ancestors(self, cid: str) -> list[str]:
        chain = []
        node = self.kb.categories[cid].record.parent
        while node is not None and node not in chain:
            chain.append(node)
            node = self.kb.categories[node].record.parent
        return list(reversed(chain))

    def subtree(self, cid: str) -> list[str]:
        out = [cid]
        for child in self.children.get(cid, []):
            out += self.subtree(child)
        return out

    def tree_order(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []

        def walk(parent: str | None, depth: int) -> None:
            for cid in self.children.get(parent, []):
                out.append((cid, depth))
                walk(cid, depth + 1)

        walk(None, 0)
        return out

    def method_label(self, mid: str) -> str:
        method = self.kb.methods[mid].record
        short = [a for a in method.aliases if len(a) <= 16]
        return short[0] if short else method.id

    def method_ancestors(self, mid: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.kb.methods[mid].record.derived_from)
        while stack:
            node = stack.pop()
            if node in seen or node not in self.kb.methods:
                continue
            seen.add(node)
            stack += self.kb.methods[node].record.derived_from
        return seen


def first_sentence(text: str, limit: int = 180) -> str:
    text = one_line(text)
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = match.group(1) if match else text
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rsplit(" ", 1)[0] + "…"


def year_of(paper: schema.Paper) -> str:
    return paper.date[:4] if paper.date else "n.d."


def venue_family(venue: str) -> str:
    """'ICML 2024' -> 'ICML': the venue without its year, for the paper filter."""
    return " ".join(re.sub(r"\b(19|20)[0-9]{2}\b", " ", venue).split()) or venue


def human_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.3g}{unit}"
    return str(n)


def gib(num_bytes: float) -> str:
    value = num_bytes / 2**30
    return f"{value:.3g} GiB" if value >= 0.1 else f"{num_bytes / 2**20:.3g} MiB"


def authors_short(paper: schema.Paper, limit: int = 3) -> str:
    if not paper.authors:
        return ""
    if len(paper.authors) <= limit:
        return ", ".join(paper.authors)
    return ", ".join(paper.authors[:limit]) + " et al."


# ---------------------------------------------------------------------------------------------------------
# Lineage diagrams: a layered drawing of the derived_from graph, written as inline SVG at build time
# ---------------------------------------------------------------------------------------------------------

NODE_W, NODE_H, COL_GAP, ROW_GAP, PAD = 136, 24, 64, 8, 6


def lineage_svg(cat: Catalogue, page: str, focus: str | None = None) -> str:
    """Methods as boxes in columns by generation (a parent left of its children), arrows from parent to child.

    With `focus`, the drawing holds the method's ancestors, the method (highlighted) and its direct children;
    without, every method. Each box links to the method's page. Within a column, boxes are ordered by the mean
    row of their parents and then of their children (two barycentre sweeps), which keeps most arrows short.
    """
    kb = cat.kb
    nodes = set(kb.methods) if focus is None else cat.method_ancestors(focus) | {focus} | set(kb.children(focus))
    parents = {n: [p for p in kb.methods[n].record.derived_from if p in nodes] for n in nodes}
    kids: dict[str, list[str]] = {n: [] for n in nodes}
    for n, ps in parents.items():
        for p in ps:
            kids[p].append(n)
    layer: dict[str, int] = {}

    def depth(n: str, trail: frozenset[str] = frozenset()) -> int:
        if n not in layer:
            ps = [p for p in parents[n] if p not in trail]
            layer[n] = 0 if not ps else 1 + max(depth(p, trail | {n}) for p in ps)
        return layer[n]

    for n in nodes:
        depth(n)
    columns: dict[int, list[str]] = defaultdict(list)
    for n in sorted(nodes, key=lambda n: (-len(kids[n]), kb.methods[n].record.name.lower())):
        columns[layer[n]].append(n)
    row_of = {n: float(i) for col in columns.values() for i, n in enumerate(col)}

    def mean(values: list[float], default: float) -> float:
        return sum(values) / len(values) if values else default

    for _ in range(2):
        for col in sorted(columns)[1:]:
            columns[col].sort(key=lambda n: mean([row_of[p] for p in parents[n]], row_of[n]))
            row_of.update({n: float(i) for i, n in enumerate(columns[col])})
        for col in sorted(columns, reverse=True)[1:]:
            columns[col].sort(key=lambda n: mean([row_of[c] for c in kids[n]], row_of[n] + len(nodes)))  # leaves last
            row_of.update({n: float(i) for i, n in enumerate(columns[col])})
    position: dict[str, tuple[float, float]] = {}
    for index, col in enumerate(sorted(columns)):
        for row, n in enumerate(columns[col]):
            position[n] = (PAD + index * (NODE_W + COL_GAP), PAD + row * (NODE_H + ROW_GAP))
    width = int(2 * PAD + len(columns) * NODE_W + max(0, len(columns) - 1) * COL_GAP)
    rows = max((len(v) for v in columns.values()), default=1)
    height = int(PAD * 2 + rows * NODE_H + (rows - 1) * ROW_GAP)
    name = kb.methods[focus].record.name if focus else "all methods"
    out = [
        f'<svg class="ptc-lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Lineage of {attr(name)}">',
        '<defs><marker id="ptc-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" class="ptc-arrowhead"/></marker></defs>',
    ]
    for child in sorted(nodes):
        for parent in sorted(parents[child]):
            (x1, y1), (x2, y2) = position[parent], position[child]
            sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H / 2, x2, y2 + NODE_H / 2
            mid = (sx + ex) / 2
            out.append(f'<path class="ptc-edge" d="M {sx:.0f} {sy:.0f} C {mid:.0f} {sy:.0f}, {mid:.0f} {ey:.0f}, {ex - 1:.0f} {ey:.0f}" marker-end="url(#ptc-arrow)"/>')
    for n in sorted(nodes, key=lambda n: position[n]):
        nx, ny = position[n]
        label = cat.method_label(n)
        if len(label) > 18:
            label = label[:17] + "…"
        cls = "ptc-node ptc-focus" if n == focus else "ptc-node"
        out.append(
            f'<a href="{href(page, method_path(n))}" class="{cls}"><title>{md(kb.methods[n].record.name)}</title>'
            f'<rect x="{nx:.0f}" y="{ny:.0f}" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
            f'<text x="{nx + NODE_W / 2:.0f}" y="{ny + NODE_H / 2:.0f}" text-anchor="middle" dominant-baseline="central">{md(label)}</text></a>'
        )
    out.append("</svg>")
    return '<div class="ptc-lineage-wrap">' + "".join(out) + "</div>"


# ---------------------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------------------

FORMAT_TITLES = {
    "chat": "Chat conversations",
    "instruction": "Instruction, input, output",
    "text": "Raw text",
    "preference": "Paired preferences",
    "unpaired": "Unpaired binary feedback",
    "prompt": "Prompts (the method generates the responses)",
    "step-labels": "Step-labelled solutions",
}


def format_anchor(data_format: str) -> str:
    return f"{GUIDE}#format-{data_format}"


def example_row(kb: KnowledgeBase, data_format: str) -> dict | None:
    from .tiny_data import GENERATORS

    for entry in kb.datasets.values():
        record = entry.record
        if record.embedded and record.format == data_format and record.embedded in GENERATORS:
            return next(iter(GENERATORS[record.embedded]()))
    return None


def hyperparameter_records(kb: KnowledgeBase, method: schema.Method, recipe=None) -> dict[str, tuple[schema.Hyperparameter, str]]:
    """name -> (record, who set it) for exactly the hyperparameters the resolver gives the method's script (it
    decides precedence, method > family > common, and e.g. that inference methods take only the seed)."""
    recipe = recipe or resolve(kb, method.id)
    tables = {
        "method": {hp.name: hp for hp in method.hyperparameters},
        "family": {e.record.name: e.record for e in kb.family_training.get(method.script.family, [])},
        "common": {e.record.name: e.record for e in kb.common_training},
    }
    labels = {"family": f"{method.script.family} family", "common": "common"}
    merged: dict[str, tuple[schema.Hyperparameter, str]] = {}
    for hp in recipe.hyperparameters:
        record = tables.get(hp.origin, {}).get(hp.name)
        if record is not None:
            merged[hp.name] = (record, labels.get(hp.origin, hp.origin))
    return merged


def source_cell(kb: KnowledgeBase, page: str, source: schema.Source) -> str:
    if source.common_practice is not None:
        return "common practice: " + md(source.common_practice)
    key = source.paper or ""
    label = key
    if key in kb.papers:
        paper = kb.papers[key].record
        label = f"{paper.authors[0].split()[-1] if paper.authors else key} {year_of(paper)}"
        return f"{link(page, f'{PAPERS}#{key}', label)}, {md(source.where)}"
    return f"{md(label)}, {md(source.where)}"


def value_text(value: object) -> str:
    return repr(value)


def range_text(hp: schema.Hyperparameter) -> str:
    if hp.range is not None:
        return f"[{hp.range[0]}, {hp.range[1]}]"
    if hp.choices is not None:
        return " | ".join(hp.choices)
    return ""


def default_cell(hp: schema.Hyperparameter) -> str:
    """The default, with the typical range or the choices below it, small."""
    cell = code(value_text(hp.default))
    return cell + (f"<br><small>{md(range_text(hp))}</small>" if range_text(hp) else "")


def hyperparameter_table(kb: KnowledgeBase, page: str, rows: Iterable[tuple[schema.Hyperparameter, str]], origin_column: bool = True) -> list[str]:
    """name | default (range below) | description | source (and, small, which record set it)."""
    lines = ["| name | default | description | source |", "|---|---|---|---|"]
    for hp, origin in rows:
        default = default_cell(hp)
        source = source_cell(kb, page, hp.source)
        if origin_column:
            source += f" <small>({md(origin)})</small>"
        lines.append(f"| {link(page, f'{HYPERPARAMETERS}#{hp.name}', hp.name)} | {default} | {md(hp.description)} | {source} |")
    return lines


def paper_line(kb: KnowledgeBase, page: str, key: str) -> str:
    paper = kb.papers[key].record
    parts = [link(page, f"{PAPERS}#{key}", paper.title)]
    meta = [x for x in (authors_short(paper), paper.venue, paper.date) if x]
    if meta:
        parts.append("— " + md(" · ".join(meta)))
    parts.append(external(paper.link, "link"))
    if paper.code:
        parts.append(external(paper.code, "code"))
    return "- " + " ".join(parts)


def method_page(kb: KnowledgeBase, method_id: str, script: str | None = None, cat: Catalogue | None = None) -> str:
    cat = cat or Catalogue(kb)
    method = kb.methods[method_id].record
    page = method_path(method_id)
    recipe = resolve(kb, method_id)
    script_name = default_script_name(recipe)
    if script is None:
        script = render_script(recipe, script_name=script_name)
    lines = front_matter(method.name, boost=3)
    lines += [f"# {md(method.name)}", "", md(method.summary), ""]

    facts = []
    crumbs = [link(page, category_path(c), kb.categories[c].record.name) for c in cat.ancestors(method.category) + [method.category]]
    facts.append(("Category", " › ".join(crumbs)))
    if method.aliases:
        facts.append(("Also called", ", ".join(md(a) for a in method.aliases)))
    facts.append(("Data", link(page, format_anchor(method.data_format), f"{method.data_format}: {FORMAT_TITLES.get(method.data_format, method.data_format)}")))
    needs = [name for name, on in (("a frozen reference model", method.needs.reference_model), ("a reward model", method.needs.reward_model), ("generation during training" if method.script.family != "inference" else "generation", method.needs.generation)) if on]
    facts.append(("Needs", md(", ".join(needs)) if needs else "only the model being trained"))
    if method.derived_from:
        facts.append(("Derived from", ", ".join(link(page, method_path(p), kb.methods[p].record.name) for p in method.derived_from)))
    children = kb.children(method_id)
    if children:
        facts.append(("Successors", ", ".join(link(page, method_path(c), kb.methods[c].record.name) for c in children)))
    facts.append(("Script", code(f"templates/{method.script.family}/variants/{method.script.variant}.py.j2")))
    if method.frameworks:
        facts.append(("Elsewhere", "; ".join(f"{md(k)}: {code(v)}" for k, v in method.frameworks.items())))
    lines += ["| | |", "|---|---|"] + [f"| **{k}** | {v} |" for k, v in facts] + [""]

    primary = kb.papers[method.papers[0]].record
    lines += ["## Objective", ""]
    lines += [f'<div class="ptc-math ptc-display">{md(method.objective.latex)}</div>', ""]
    lines += [f"{md(method.objective.equation)} of {link(page, f'{PAPERS}#{primary.key}', primary.title)}. In plain notation, as the script's docstring states it:", ""]
    lines += [fence(method.objective.plain, "text"), ""]

    lines += ["## Hyperparameters", ""]
    lines += [
        f"Defaults of {code(script_name)}: the method's own values first, then the {md(method.script.family)} family's "
        f"and the common training defaults ({link(page, HYPERPARAMETERS, 'all hyperparameters')}). "
        "Override any of them with `--set name=value` at compile time or `--name value` when running the script.",
        "",
    ]
    records = list(hyperparameter_records(kb, method, recipe).values())
    rank = {"method": 0, "common": 2}
    records.sort(key=lambda r: rank.get(r[1], 1))  # the method's own values first, then its family's, then common
    lines += hyperparameter_table(kb, page, records)
    lines += [""]

    lines += ["## Lineage", ""]
    lines += [lineage_svg(cat, page, focus=method_id), ""]
    lines += [f"Ancestors (from `derived_from`), this method and its direct successors. {link(page, 'methods/index.md#lineage', 'The whole tree')}.", ""]

    lines += ["## Data format", ""]
    lines += [f"The script reads rows of format {link(page, format_anchor(method.data_format), method.data_format)} (JSON lines, a local file or a Hub dataset):", ""]
    lines += ["| field | meaning |", "|---|---|"]
    lines += [f"| {code(name)} | {md(meaning)} |" for name, meaning in FORMAT_FIELDS.get(method.data_format, [])]
    lines += [""]
    dataset = kb.datasets.get(method.default_dataset)
    if dataset is not None:
        lines += [f"Default dataset: {link(page, f'{DATASETS}#dataset-{dataset.record.id}', dataset.record.name)}. Other columns map with `--<field>_column NAME`.", ""]
    row = example_row(kb, method.data_format)
    if row is not None:
        lines += ["A row of the bundled tiny dataset:", "", fence(json.dumps(row, ensure_ascii=False), "json"), ""]

    if method.pitfalls:
        lines += ["## Pitfalls", ""] + [f"- {md(p)}" for p in method.pitfalls] + [""]

    lines += ["## Papers", ""] + [paper_line(kb, page, key) for key in method.papers] + [""]

    lines += ["## Compile", ""]
    lines += [fence(f"{recipe.command} -o {script_name}\npython {script_name}                  # one GPU (or CPU)\naccelerate launch {script_name}       # every GPU of the machine", "bash"), ""]
    if kb.peft:
        lines += [
            "Add `--peft ID` for a parameter-efficient variant: "
            + ", ".join(f"{link(page, peft_path(p), p)}" for p in sorted(kb.peft))
            + ". `--set name=value` overrides a default and records it in the script's header.",
            "",
        ]
    lines += ["### For each model preset", ""]
    lines += ["| model | parameters | command |", "|---|---|---|"]
    for model_id, entry in sorted(kb.models.items(), key=lambda kv: (kv[1].record.num_parameters, kv[0])):
        cmd = f"ptcompile {method.id} --model {model_id} -o {script_name}"
        lines.append(f"| {link(page, model_path(model_id), entry.record.name)} | {human_count(entry.record.num_parameters)} | {code(cmd)} |")
    lines += [""]

    lines += ["## Generated script", ""]
    lines += [f"{code(script_name)} compiled for {link(page, model_path(recipe.model.id), recipe.model.name)} with the defaults above ({len(script.splitlines())} lines; [download](../scripts/{script_name})).", ""]
    lines += [f'??? example "{md(script_name)}"', ""]
    lines += [f'    <div class="ptc-script" data-script="{attr(script_name)}"></div>', ""]
    return "\n".join(lines)


def methods_index(cat: Catalogue) -> str:
    kb = cat.kb
    page = "methods/index.md"
    lines = front_matter("Methods", boost=2) + ["# Methods", ""]
    lines += [f"{len(kb.methods)} methods, each compiled into a single-file training script. Pick one by the data you have in {link(page, GUIDE, 'the guide')}.", ""]
    lines += ["| method | category | data | needs | primary paper |", "|---|---|---|---|---|"]
    for mid in sorted(kb.methods, key=lambda m: kb.methods[m].record.name.lower()):
        method = kb.methods[mid].record
        needs = [n for n, on in (("ref", method.needs.reference_model), ("RM", method.needs.reward_model), ("gen", method.needs.generation)) if on]
        primary = kb.papers[method.papers[0]].record
        lines.append(
            f"| {link(page, method_path(mid), method.name)} | {link(page, category_path(method.category), kb.categories[method.category].record.name)} "
            f"| {link(page, format_anchor(method.data_format), method.data_format)} | {md(', '.join(needs)) or '–'} "
            f"| {link(page, f'{PAPERS}#{primary.key}', f'{primary.title}')} ({md(year_of(primary))}) |"
        )
    lines += ["", "**needs**: ref = a frozen reference model, RM = a reward model, gen = generation during training.", ""]
    lines += ["## Lineage", "", "Every method, left to right by generation; an arrow points from a method to one derived from it.", ""]
    lines += [lineage_svg(cat, page), ""]
    return "\n".join(lines)


def category_tree(cat: Catalogue, page: str, root: str | None = None) -> list[str]:
    kb = cat.kb
    lines = []
    base_depth = None
    order = cat.tree_order() if root is None else [(c, d) for c, d in cat.tree_order() if c in cat.subtree(root) and c != root]
    for cid, depth in order:
        if base_depth is None:
            base_depth = depth
        record = kb.categories[cid].record
        methods = cat.methods_by_category.get(cid, [])
        extra = []
        if methods:
            extra.append("methods: " + ", ".join(link(page, method_path(m), cat.method_label(m)) for m in methods))
        if cid == "peft" and kb.peft:
            extra.append("techniques: " + ", ".join(link(page, peft_path(p), p) for p in sorted(kb.peft)))
        papers = len(cat.papers_by_category.get(cid, []))
        if papers:
            extra.append(f"{papers} paper{'s' if papers != 1 else ''}")
        indent = "    " * (depth - base_depth)
        lines.append(f"{indent}- **{link(page, category_path(cid), record.name)}** — {md(first_sentence(record.description, 140))}" + (f" <small>{' · '.join(extra)}</small>" if extra else ""))
    return lines


def home_page(cat: Catalogue) -> str:
    kb = cat.kb
    page = "index.md"
    lines = front_matter("ptcompile") + ["# ptcompile", ""]
    lines += [
        "A curated knowledge base of LLM post-training — papers, methods, hyperparameters with their sources, model "
        "presets and datasets, mirroring the survey *LLM Post-Training: A Deep Dive into Reasoning Large Language Models* "
        "(arXiv 2502.21321) — that compiles itself into this site and into a runnable single-file training script per "
        "method and model.",
        "",
        f"**{len(kb.methods)}** methods · **{len(kb.papers)}** papers · **{len(kb.models)}** model presets · "
        f"**{len(kb.peft)}** PEFT techniques · **{len(kb.datasets)}** datasets · **{len(kb.categories)}** categories",
        "",
        "## How to start",
        "",
        fence(
            "pip install -e \".[train]\"                          # in a checkout of ptcompile\n"
            "ptcompile list methods                             # or browse the Methods tab\n"
            "ptcompile dpo --model llama3-8b -o train_dpo.py    # compile a method for a model preset\n"
            "python train_dpo.py                                # one GPU (or CPU)\n"
            "accelerate launch train_dpo.py                     # every GPU",
            "bash",
        ),
        "",
        "Try it without a GPU or a download: `ptcompile tiny` writes an embedded 158k-parameter model and tiny datasets, "
        "and `ptcompile dpo --model tiny -o train_dpo.py && python train_dpo.py` trains in seconds on a CPU.",
        "",
        f"Not sure which method fits your data? Read {link(page, GUIDE, 'which method should I use?')}. Each method page "
        "gives the objective, every default with its source, the lineage, the data format, pitfalls, the papers, and the "
        "compiled script.",
        "",
        "## The taxonomy",
        "",
    ]
    lines += category_tree(cat, page)
    lines += [""]
    return "\n".join(lines)


def categories_index(cat: Catalogue) -> str:
    page = "categories/index.md"
    lines = front_matter("Categories") + ["# Categories", ""]
    lines += ["The category tree mirrors the survey's taxonomy (fine-tuning, reinforcement learning, test-time scaling) and the sections of its paper list.", ""]
    lines += category_tree(cat, page) + [""]
    return "\n".join(lines)


def category_page(cat: Catalogue, cid: str) -> str:
    kb = cat.kb
    record = kb.categories[cid].record
    page = category_path(cid)
    lines = front_matter(record.name, boost=1.5) + [f"# {md(record.name)}", ""]
    crumbs = [link(page, category_path(c), kb.categories[c].record.name) for c in cat.ancestors(cid)]
    if crumbs:
        lines += ["Part of " + " › ".join(crumbs) + ".", ""]
    lines += [md(record.description), ""]
    if record.survey_section:
        lines += [f"Survey: {md(record.survey_section)}.", ""]
    sub = category_tree(cat, page, root=cid)
    if sub:
        lines += ["## Subcategories", ""] + sub + [""]
    methods = [m for c in cat.subtree(cid) for m in cat.methods_by_category.get(c, [])]
    if methods:
        lines += ["## Methods", "", "| method | data | summary |", "|---|---|---|"]
        for m in methods:
            method = kb.methods[m].record
            lines.append(f"| {link(page, method_path(m), method.name)} | {md(method.data_format)} | {md(first_sentence(method.summary))} |")
        lines += [""]
    if cid == "peft" and kb.peft:
        lines += ["## Techniques", ""] + [f"- {link(page, peft_path(p), kb.peft[p].record.name)}" for p in sorted(kb.peft)] + [""]
    papers = cat.papers_by_category.get(cid, [])
    if papers:
        lines += [f"## Papers ({len(papers)})", "", f'<a class="md-button" href="{href(page, PAPERS)}?category={attr(cid)}">Open in the paper index</a>', ""]
        lines += [paper_line(kb, page, key) for key in papers] + [""]
    return "\n".join(lines)


def papers_page(cat: Catalogue) -> str:
    kb = cat.kb
    page = PAPERS
    keys = cat.papers_sorted()
    lines = front_matter("Papers", boost=1) + ["# Papers", ""]
    lines += [
        f"{len(keys)} papers, surveys, benchmarks and repositories, newest first. Filter by category, year and venue; "
        "every entry has its BibTeX with a copy button.",
        "",
    ]
    categories = [(cid, d) for cid, d in cat.tree_order() if cat.papers_by_category.get(cid)]
    years = sorted({year_of(kb.papers[k].record) for k in keys}, reverse=True)
    venues: dict[str, int] = defaultdict(int)
    for k in keys:
        venues[venue_family(kb.papers[k].record.venue)] += 1
    options_cat = "".join(
        f'<option value="{attr(cid)}">{"&nbsp;&nbsp;" * d}{md(kb.categories[cid].record.name)} ({len(cat.papers_by_category[cid])})</option>' for cid, d in categories
    )
    options_year = "".join(f'<option value="{attr(y)}">{md(y)}</option>' for y in years)
    options_venue = "".join(f'<option value="{attr(v)}">{md(v)} ({n})</option>' for v, n in sorted(venues.items(), key=lambda kv: (-kv[1], kv[0].lower())))
    lines += [
        '<form class="ptc-filters" id="ptc-paper-filters" data-search-exclude>'
        f'<label>Category <select name="category"><option value="">all</option>{options_cat}</select></label>'
        f'<label>Year <select name="year"><option value="">all</option>{options_year}</select></label>'
        f'<label>Venue <select name="venue"><option value="">all</option>{options_venue}</select></label>'
        '<label>Text <input type="search" name="text" placeholder="title, author, summary"></label>'
        '<button type="reset" class="md-button">Clear</button>'
        f'<output class="ptc-count" aria-live="polite">{len(keys)} papers</output>'
        "</form>",
        "",
    ]
    for key in keys:
        lines += [paper_entry(cat, page, key), ""]
    return "\n".join(lines)


def paper_entry(cat: Catalogue, page: str, key: str) -> str:
    kb = cat.kb
    paper = kb.papers[key].record
    parts = [
        f'<div class="ptc-paper" data-category="{attr(" ".join(sorted(set(c for cid in paper.categories for c in [cid] + cat.ancestors(cid)))))}" '
        f'data-year="{attr(year_of(paper))}" data-venue="{attr(venue_family(paper.venue))}">',
        f'<h3 id="{attr(key)}">{md(paper.title)}</h3>',
    ]
    meta = [x for x in (", ".join(paper.authors) if paper.authors else "", paper.venue, paper.date or "", paper.kind if paper.kind != "paper" else "") if x]
    parts.append(f'<p class="ptc-meta">{md(" · ".join(meta))}</p>')
    links = []
    if paper.arxiv:
        links.append(external(f"https://arxiv.org/abs/{paper.arxiv}", f"arXiv {paper.arxiv}"))
    if paper.doi:
        links.append(external(f"https://doi.org/{paper.doi}", f"DOI {paper.doi}"))
    if paper.url:
        links.append(external(paper.url, "web"))
    if paper.code:
        links.append(external(paper.code, "code"))
    parts.append(f'<p class="ptc-links">{" · ".join(links)}</p>')
    if paper.summary:
        parts.append(f"<p>{md(paper.summary)}</p>")
    tags = [f'<a class="ptc-tag" href="{href(page, category_path(c))}">{md(kb.categories[c].record.name)}</a>' for c in paper.categories if c in kb.categories]
    used = [f'<a href="{href(page, target)}">{md(name)}</a>' for target, name in cat.cited_by.get(key, [])]
    parts.append(f'<p class="ptc-tags">{" ".join(tags)}' + (f" · used by {', '.join(used)}" if used else "") + "</p>")
    bib = kb.bibtex.get(key)
    if bib is not None:
        parts.append(f'<details class="ptc-bibtex"><summary>BibTeX</summary>{pre(bib.raw, "bibtex")}</details>')
    parts.append("</div>")
    return "".join(parts)


def hyperparameters_page(cat: Catalogue) -> str:
    kb = cat.kb
    page = HYPERPARAMETERS
    uses: dict[str, list[tuple[str, schema.Hyperparameter]]] = defaultdict(list)
    for entry in kb.common_training:
        uses[entry.record.name].append(("every training family (common)", entry.record))
    for family, entries in sorted(kb.family_training.items()):
        for entry in entries:
            uses[entry.record.name].append((f"family {family}", entry.record))
    for mid in sorted(kb.methods):
        for hp in kb.methods[mid].record.hyperparameters:
            uses[hp.name].append((f"method:{mid}", hp))
    for pid in sorted(kb.peft):
        for hp in kb.peft[pid].record.hyperparameters:
            uses[hp.name].append((f"peft:{pid}", hp))
    lines = front_matter("Hyperparameters", boost=1.5) + ["# Hyperparameters", ""]
    lines += [
        f"{len(uses)} names. For each: where a default is set (the shared training defaults, a script family, a method or "
        "a PEFT technique), its value, its range and its source. A method's value overrides its family's, which overrides "
        "the common one.",
        "",
    ]
    for name in sorted(uses):
        lines += [f"## {md(name)} {{ #{name} }}", ""]
        lines += ["| where | default | description | source |", "|---|---|---|---|"]
        for where, hp in uses[name]:
            if where.startswith("method:"):
                mid = where.split(":", 1)[1]
                where_cell = link(page, method_path(mid), kb.methods[mid].record.name)
            elif where.startswith("peft:"):
                pid = where.split(":", 1)[1]
                where_cell = link(page, peft_path(pid), kb.peft[pid].record.name)
            else:
                where_cell = md(where)
            lines.append(f"| {where_cell} | {default_cell(hp)} | {md(hp.description)} | {source_cell(kb, page, hp.source)} |")
        lines += [""]
    return "\n".join(lines)


def guide_page(cat: Catalogue) -> str:
    kb = cat.kb
    page = GUIDE
    lines = front_matter("Which method should I use?", boost=1.5) + ["# Which method should I use?", ""]
    lines += [
        "This guide is derived from the catalogue itself: each method's data format, what it keeps in memory besides "
        "the model it trains, and whether it generates text while training. Start from the data you have, then check "
        "the memory column against your hardware.",
        "",
    ]
    groups: dict[str, list[str]] = defaultdict(list)
    for mid in sorted(kb.methods, key=lambda m: kb.methods[m].record.name.lower()):
        groups[situation(kb.methods[mid].record)].append(mid)
    lines += ["## 1. What data or feedback do you have? { #data }", ""]
    for key, (title, explanation) in SITUATIONS.items():
        members = groups.get(key, [])
        if not members:
            continue
        lines += [f"### {md(title)} {{ #{key} }}", "", explanation, ""]
        lines += ["| method | category | in memory while training | summary |", "|---|---|---|---|"]
        for mid in members:
            method = kb.methods[mid].record
            lines.append(f"| {link(page, method_path(mid), method.name)} | {link(page, category_path(method.category), kb.categories[method.category].record.name)} | {md(memory_words(method))} | {md(first_sentence(method.summary))} |")
        lines += [""]

    lines += ["## 2. How much memory do you have? { #memory }", ""]
    lines += [
        "Training holds the model being trained (weights, gradients and optimizer state: roughly 16 bytes per trained "
        "parameter with AdamW and float32 master weights) plus every frozen model the method needs (weights only: 2 bytes "
        "per parameter in bfloat16). Methods that generate during training also need room for the sampled sequences. "
        "A PEFT adapter (`--peft lora`, or `--peft qlora` with a 4-bit base) trains well under 1% of the parameters, "
        "which removes most of the first term.",
        "",
        "| frozen models besides the trained one | methods |",
        "|---|---|",
    ]
    by_copies: dict[int, list[str]] = defaultdict(list)
    for mid, entry in kb.methods.items():
        by_copies[frozen_copies(entry.record)].append(mid)
    for copies in sorted(by_copies):
        names = sorted(by_copies[copies], key=lambda m: kb.methods[m].record.name.lower())
        lines.append(f"| {copies} | " + ", ".join(link(page, method_path(m), cat.method_label(m)) for m in names) + " |")
    lines += ["", "Weights of one model, per preset (a frozen copy costs this much again):", ""]
    lines += ["| model | parameters | bfloat16 weights | trained in full (≈16 B/param) |", "|---|---|---|---|"]
    for mid, entry in sorted(kb.models.items(), key=lambda kv: (kv[1].record.num_parameters, kv[0])):
        n = entry.record.num_parameters
        lines.append(f"| {link(page, model_path(mid), entry.record.name)} | {human_count(n)} | {gib(2 * n)} | {gib(16 * n)} |")
    lines += [
        "",
        "These are the parameter terms only (activations, sequence length and batch size come on top); each model's "
        "page has `ptcompile estimate`'s peak memory per method and PEFT choice.",
        "",
    ]

    lines += ["## 3. Data formats { #formats }", ""]
    for fmt, fields in FORMAT_FIELDS.items():
        users = [m for m in sorted(kb.methods) if kb.methods[m].record.data_format == fmt]
        lines += [f"### {md(fmt)}: {md(FORMAT_TITLES.get(fmt, fmt))} {{ #format-{fmt} }}", ""]
        lines += ["| field | meaning |", "|---|---|"] + [f"| {code(f)} | {md(m)} |" for f, m in fields] + [""]
        families = sorted(f for f, formats in FAMILY_FORMATS.items() if fmt in formats)
        lines += [f"Script families that read it: {md(', '.join(families))}."]
        if users:
            lines += ["", "Methods whose data it is: " + ", ".join(link(page, method_path(m), cat.method_label(m)) for m in users) + "."]
        datasets = sorted(d for d, e in kb.datasets.items() if e.record.format == fmt)
        if datasets:
            lines += ["", "Dataset presets: " + ", ".join(link(page, f"{DATASETS}#dataset-{d}", d) for d in datasets) + "."]
        row = example_row(kb, fmt)
        if row is not None:
            lines += ["", fence(json.dumps(row, ensure_ascii=False), "json")]
        lines += [""]
    return "\n".join(lines)


SITUATIONS: dict[str, tuple[str, str]] = {
    "demonstrations": ("Demonstrations: good responses to imitate", "Chat transcripts, instruction/response pairs or raw domain text. Supervised fine-tuning and its relatives learn from them directly; they are also the usual first stage before any preference or RL method."),
    "paired": ("Paired preferences: a chosen and a rejected response per prompt", "Offline preference losses (and reward models) learn from the pair; no sampling during training."),
    "unpaired": ("Unpaired feedback: single responses marked good or bad", "Thumbs-up/down data without a matching pair for each prompt. These losses need no pairing; some also accept paired data split into halves."),
    "prompts-verifier": ("Prompts only: the method generates and scores its own responses", "Prompts, often with a reference answer that a program can check (verifiable rewards for math or code), or a critique by the model itself. The method samples during training."),
    "prompts-reward-model": ("Prompts plus a reward model", "The method samples responses and scores them with a learned reward model (RLHF-style)."),
    "step-labels": ("Step-by-step solutions with per-step correctness labels", "Process supervision: a model learns to score each reasoning step."),
    "inference": ("No training at all: spend compute at inference", "Test-time scaling methods run a fixed model several times (sampling, voting, search); some use a verifier or reward model."),
    "other": ("Other data", "Methods whose data format is not covered above."),
}


def situation(method: schema.Method) -> str:
    fmt = method.data_format
    if method.script.family == "inference":
        return "inference"
    if fmt in ("chat", "instruction", "text"):
        return "demonstrations"
    if fmt == "preference":
        return "paired"
    if fmt == "unpaired":
        return "unpaired"
    if fmt == "step-labels":
        return "step-labels"
    if fmt == "prompt":
        return "prompts-reward-model" if method.needs.reward_model else "prompts-verifier"
    return "other"


def frozen_copies(method: schema.Method) -> int:
    return int(method.needs.reference_model) + int(method.needs.reward_model)


def memory_words(method: schema.Method) -> str:
    if method.script.family == "inference":
        parts = ["the model (inference only)"]
    else:
        parts = ["the trained model"]
    if method.needs.reference_model:
        parts.append("a frozen reference")
    if method.needs.reward_model:
        parts.append("a reward model")
    text = " + ".join(parts)
    if method.needs.generation:
        text += "; generates"
    return text


def models_index(cat: Catalogue) -> str:
    kb = cat.kb
    page = "models/index.md"
    lines = front_matter("Model presets") + ["# Model presets", ""]
    lines += ["Every method compiles for any of these presets (`--model ID`): the preset gives the Hub id, the dtype, the chat template and the LoRA target modules.", ""]
    lines += ["| preset | id | parameters | architecture | layers × hidden | licence |", "|---|---|---|---|---|---|"]
    for mid, entry in sorted(kb.models.items(), key=lambda kv: (kv[1].record.num_parameters, kv[0])):
        m = entry.record
        a = m.architecture
        lines.append(f"| {link(page, model_path(mid), m.name)} | {code(mid)} | {human_count(m.num_parameters)} | {md(a.model_type)} | {a.num_layers} × {a.hidden_size} | {md(m.license)}{' (gated)' if m.gated else ''} |")
    lines += [""]
    return "\n".join(lines)


def model_page(cat: Catalogue, model_id: str) -> str:
    kb = cat.kb
    m = kb.models[model_id].record
    a = m.architecture
    page = model_path(model_id)
    lines = front_matter(m.name, boost=1.5) + [f"# {md(m.name)}", ""]
    if m.hub_id:
        lines += [f"Hugging Face Hub: {external('https://huggingface.co/' + m.hub_id, m.hub_id)}" + (" (gated: accept the licence on the Hub first)" if m.gated else ""), ""]
    else:
        lines += ["Embedded in ptcompile: `ptcompile tiny DIR` writes it (random init, bundled tokenizer); nothing is downloaded.", ""]
    rows = [
        ("preset id", code(m.id)),
        ("parameters", f"{m.num_parameters:,} ({human_count(m.num_parameters)})"),
        ("architecture", code(a.model_type)),
        ("layers", str(a.num_layers)),
        ("hidden size", str(a.hidden_size)),
        ("MLP size", str(a.intermediate_size)),
        ("attention heads / KV heads", f"{a.num_attention_heads} / {a.num_key_value_heads}"),
        ("head dim", str(a.head_dim)),
        ("vocabulary", f"{a.vocab_size:,}"),
        ("context length", f"{a.max_position_embeddings:,}"),
        ("tied embeddings", "yes" if a.tie_word_embeddings else "no"),
    ]
    if a.num_experts:
        rows.append(("experts (active per token)", f"{a.num_experts} ({a.num_experts_per_token})"))
    rows += [
        ("dtype", code(m.dtype)),
        ("chat template", md(m.chat_template.name if m.chat_template.source == "named" else "the tokenizer's own")),
        ("LoRA target modules", ", ".join(code(t) for t in m.lora_target_modules)),
        ("licence", md(m.license)),
        ("dimensions from", md(m.config_source)),
    ]
    lines += ["| | |", "|---|---|"] + [f"| **{k}** | {v} |" for k, v in rows] + [""]
    if m.papers:
        lines += ["## Papers", ""] + [paper_line(kb, page, key) for key in m.papers] + [""]
    n = m.num_parameters
    lines += ["## Memory", ""]
    lines += ["| | size |", "|---|---|"]
    lines += [f"| weights in float32 | {gib(4 * n)} |", f"| weights in bfloat16 | {gib(2 * n)} |", f"| weights in 4 bits (QLoRA's NF4 base, before quantization constants) | {gib(n / 2)} |"]
    lines += [f"| full fine-tuning, parameter terms (float32 weights + gradients + AdamW moments, 16 B/param) | {gib(16 * n)} |", ""]
    lines += [f"A method with a frozen reference or reward model adds another copy of the weights for each ({link(page, GUIDE + '#memory', 'the guide')} lists which).", ""]
    lines += memory_table(kb, model_id)
    lines += ["## Compile a method for this model", ""]
    lines += ["| method | command |", "|---|---|"]
    for mid in sorted(kb.methods, key=lambda x: kb.methods[x].record.name.lower()):
        method = kb.methods[mid].record
        name = f"train_{mid.replace('-', '_').replace('.', '_')}.py"
        lines.append(f"| {link(page, method_path(mid), method.name)} | {code(f'ptcompile {mid} --model {model_id} -o {name}')} |")
    lines += [""]
    return "\n".join(lines)


ESTIMATE_METHODS = ("sft", "dpo", "grpo")
ESTIMATE_PEFT = ("none", "lora", "qlora")


def memory_table(kb: KnowledgeBase, model_id: str) -> list[str]:
    """Peak GPU memory per method and PEFT choice from `ptcompile estimate`, at each method's default batch and length."""
    from .estimate import GPUS, GiB, estimate

    rows = []
    for method_id in ESTIMATE_METHODS:
        if method_id not in kb.methods:
            continue
        for peft in ESTIMATE_PEFT:
            if peft != "none" and peft not in kb.peft:
                continue
            recipe = resolve(kb, method_id, model_id, peft)
            result = estimate(recipe)
            fits = [label for label, capacity in GPUS.items() if result.total / GiB <= capacity]
            seq = recipe.hp("max_length") if recipe.has("max_length") else "-"
            batch = recipe.hp("per_device_train_batch_size") if recipe.has("per_device_train_batch_size") else "-"
            rows.append(f"| {code(method_id)} | {code(peft)} | {batch} x {seq} | {result.total / GiB:,.1f} GiB | {md(fits[0]) if fits else 'more than 141GB: use FSDP or gradient checkpointing'} |")
    if not rows:
        return []
    return [
        "### Estimated peak GPU memory",
        "",
        "From `ptcompile estimate` (weights, optimiser state, activations, logits, frozen copies and CUDA overhead; "
        "default micro-batch and sequence length of each method; no gradient checkpointing). "
        f"Try other settings with {code('ptcompile estimate METHOD --model ' + model_id + ' --seq N --batch B')}.",
        "",
        "| method | PEFT | batch x length | peak | smallest GPU that fits |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def peft_index(cat: Catalogue) -> str:
    kb = cat.kb
    page = "peft/index.md"
    lines = front_matter("PEFT techniques") + ["# Parameter-efficient fine-tuning", ""]
    lines += ["Any method compiles with a PEFT technique: `ptcompile METHOD --model MODEL --peft ID`.", ""]
    lines += ["| technique | id | summary |", "|---|---|---|"]
    for pid in sorted(kb.peft):
        record = kb.peft[pid].record
        lines.append(f"| {link(page, peft_path(pid), record.name)} | {code(pid)} | {md(first_sentence(record.summary))} |")
    lines += [""]
    return "\n".join(lines)


def peft_page(cat: Catalogue, pid: str) -> str:
    kb = cat.kb
    record = kb.peft[pid].record
    page = peft_path(pid)
    lines = front_matter(record.name, boost=1.5) + [f"# {md(record.name)}", "", md(record.summary), ""]
    if record.derived_from:
        lines += ["Derived from " + ", ".join(link(page, peft_path(p), kb.peft[p].record.name) for p in record.derived_from) + ".", ""]
    if record.quantized:
        lines += ["The base model is loaded quantized (needs bitsandbytes and a CUDA GPU).", ""]
    lines += ["## Use", "", fence(f"ptcompile dpo --model llama3-8b --peft {pid} -o train_dpo.py", "bash"), ""]
    if record.hyperparameters:
        lines += ["## Hyperparameters", ""] + hyperparameter_table(kb, page, [(hp, "technique") for hp in record.hyperparameters], origin_column=False) + [""]
    if record.pitfalls:
        lines += ["## Pitfalls", ""] + [f"- {md(p)}" for p in record.pitfalls] + [""]
    lines += ["## Papers", ""] + [paper_line(kb, page, key) for key in record.papers] + [""]
    return "\n".join(lines)


def datasets_page(cat: Catalogue) -> str:
    kb = cat.kb
    page = DATASETS
    lines = front_matter("Dataset presets", boost=1.5) + ["# Dataset presets", ""]
    lines += ["Pass `--dataset ID` at compile time; the preset sets the Hub id, split and column names. The `tiny-*` presets are bundled (`ptcompile tiny`).", ""]
    for did, entry in sorted(kb.datasets.items()):
        d = entry.record
        lines += [f"## {md(d.name)} {{ #dataset-{did} }}", ""]
        where = external("https://huggingface.co/datasets/" + d.hub_id, d.hub_id) if d.hub_id else f"bundled file {code(d.embedded)}"
        facts = [("id", code(did)), ("source", where), ("split", code(d.split)), ("format", link(page, format_anchor(d.format), d.format))]
        if d.config:
            facts.append(("config", code(d.config)))
        if d.size:
            facts.append(("rows", f"{d.size:,}"))
        if d.columns:
            facts.append(("columns", ", ".join(f"{code(k)} ← {code(v)}" for k, v in d.columns.items())))
        facts.append(("licence", md(d.license)))
        lines += ["| | |", "|---|---|"] + [f"| **{k}** | {v} |" for k, v in facts] + [""]
        lines += [md(d.description), ""]
        if d.papers:
            lines += [paper_line(kb, page, key) for key in d.papers] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Writing the site
# ---------------------------------------------------------------------------------------------------------


def site_pages(kb: KnowledgeBase, scripts: Mapping[str, str] | None = None) -> dict[str, str]:
    """docs-relative path -> page text (Markdown, or a script for docs/scripts/)."""
    cat = Catalogue(kb)
    pages: dict[str, str] = {
        "index.md": home_page(cat),
        GUIDE: guide_page(cat),
        "methods/index.md": methods_index(cat),
        "categories/index.md": categories_index(cat),
        PAPERS: papers_page(cat),
        HYPERPARAMETERS: hyperparameters_page(cat),
        "models/index.md": models_index(cat),
        DATASETS: datasets_page(cat),
    }
    for mid in kb.methods:
        recipe = resolve(kb, mid)
        name = default_script_name(recipe)
        script = (scripts or {}).get(name) or render_script(recipe, script_name=name)
        pages[f"scripts/{name}"] = script
        pages[f"scripts/{name}.html"] = highlight_python(script)
        pages[method_path(mid)] = method_page(kb, mid, script, cat)
    for cid in kb.categories:
        pages[category_path(cid)] = category_page(cat, cid)
    for model_id in kb.models:
        pages[model_path(model_id)] = model_page(cat, model_id)
    if kb.peft:
        pages["peft/index.md"] = peft_index(cat)
        for pid in kb.peft:
            pages[peft_path(pid)] = peft_page(cat, pid)
    return pages


def navigation(kb: KnowledgeBase) -> list:
    """The nav for mkdocs (titles are HTML-escaped: the theme prints them as they are)."""
    cat = Catalogue(kb)
    esc = lambda text: html.escape(_visible(text), quote=True)  # noqa: E731
    methods: list = ["methods/index.md"]
    for cid in cat.category_order:
        members = cat.methods_by_category.get(cid, [])
        if members:
            methods.append({esc(kb.categories[cid].record.name): [method_path(m) for m in members]})
    nav: list = [
        {"Home": "index.md"},
        {"Which method?": GUIDE},
        {"Methods": methods},
        {"Categories": ["categories/index.md"] + [category_path(c) for c, _ in cat.tree_order()]},
        {"Papers": PAPERS},
        {"Hyperparameters": HYPERPARAMETERS},
    ]
    presets: list = [{"Models": ["models/index.md"] + [model_path(m) for m in sorted(kb.models, key=lambda m: (kb.models[m].record.num_parameters, m))]}]
    if kb.peft:
        presets.append({"PEFT": ["peft/index.md"] + [peft_path(p) for p in sorted(kb.peft)]})
    presets.append({"Datasets": DATASETS})
    nav.append({"Presets": presets})
    return nav


SKELETON = ("mkdocs.yml", "hooks.py", "assets")


def write_site(kb: KnowledgeBase, site_dir: Path, scripts: Mapping[str, str] | None = None, skeleton: Path | None = None) -> int:
    """Write site_dir/docs (pages, assets, _nav.json). With `skeleton` (a checkout's site/), first copy its
    mkdocs.yml, hooks.py and assets/ into site_dir, so a site can be built anywhere (tests use a temporary one)."""
    site_dir = Path(site_dir)
    if skeleton is not None and Path(skeleton).resolve() != site_dir.resolve():
        site_dir.mkdir(parents=True, exist_ok=True)
        for name in SKELETON:
            src = Path(skeleton) / name
            dst = site_dir / name
            if dst.is_dir():
                shutil.rmtree(dst)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
    docs = site_dir / "docs"
    if docs.exists():
        shutil.rmtree(docs)
    docs.mkdir(parents=True)
    pages = site_pages(kb, scripts)
    for rel_path, text in pages.items():
        path = docs / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    assets = site_dir / "assets"
    if assets.is_dir():
        shutil.copytree(assets, docs / "assets", ignore=shutil.ignore_patterns("*.md"))
    (docs / "_nav.json").write_text(json.dumps(navigation(kb), indent=1) + "\n", encoding="utf-8")
    return sum(1 for p in pages if p.endswith(".md"))
