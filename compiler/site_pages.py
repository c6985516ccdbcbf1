"""Markdown pages of the reference site, generated from the knowledge base (mkdocs-material renders them).

Contributor text is escaped for Markdown and HTML (`md` below) before it lands on a page: a title like
`<script>` or `[x](javascript:...)` renders as text. Code (the generated scripts) goes in fenced blocks.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

from .knowledge_base import KnowledgeBase
from .recipe import resolve
from .render import default_script_name, render_script

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")


def md(text: object) -> str:
    """Inline text safe in Markdown and HTML: entities for <>&\"', backslash before Markdown syntax."""
    escaped = html.escape(" ".join(str(text).split()), quote=True)
    return _MD_SPECIAL.sub(r"\\\1", escaped)


def fence(code: str, language: str = "python") -> str:
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", code)), default=0) + 1)
    return f"{ticks}{language}\n{code.rstrip()}\n{ticks}"


def method_page(kb: KnowledgeBase, method_id: str) -> str:
    method = kb.methods[method_id].record
    recipe = resolve(kb, method_id)
    script = render_script(recipe, script_name=default_script_name(recipe))
    lines = [f"# {md(method.name)}", "", md(method.summary), ""]
    lines += [f"**Category:** {md(method.category)} · **Data:** {md(method.data_format)} · **Family:** {md(method.script.family)}", ""]
    lines += ["## Objective", "", f"{md(method.objective.equation)}:", "", fence(method.objective.plain, "text"), ""]
    lines += ["## Hyperparameters", "", "| name | default | description | source |", "|---|---|---|---|"]
    for hp in recipe.hyperparameters:
        lines.append(f"| `{hp.name}` | `{md(repr(hp.value))}` | {md(hp.description)} | {md(hp.source)} |")
    lines += ["", "## Papers", ""]
    for key in method.papers:
        paper = kb.papers[key].record
        lines.append(f"- {md(paper.title)} ({md(paper.date or 'n.d.')}, {md(paper.venue)}) — <{html.escape(paper.link)}>")
    if method.pitfalls:
        lines += ["", "## Pitfalls", ""] + [f"- {md(p)}" for p in method.pitfalls]
    lines += ["", "## Compile", "", fence(f"{recipe.command} -o {default_script_name(recipe)}", "bash"), ""]
    lines += ["## Generated script", "", fence(script), ""]
    return "\n".join(lines)


def write_site(kb: KnowledgeBase, site_dir: Path) -> int:
    docs = site_dir / "docs"
    if docs.exists():
        shutil.rmtree(docs)
    (docs / "methods").mkdir(parents=True)
    index = ["# ptcompile", "", "A post-training knowledge base that compiles itself into training scripts.", "", "## Methods", ""]
    for method_id in sorted(kb.methods):
        method = kb.methods[method_id].record
        (docs / "methods" / f"{method_id}.md").write_text(method_page(kb, method_id), encoding="utf-8")
        index.append(f"- [{md(method.name)}](methods/{method_id}.md)")
    (docs / "index.md").write_text("\n".join(index) + "\n", encoding="utf-8")
    papers = ["# Papers", "", "| title | date | venue | link |", "|---|---|---|---|"]
    for key, entry in sorted(kb.papers.items(), key=lambda kv: kv[1].record.date or "", reverse=True):
        paper = entry.record
        papers.append(f"| {md(paper.title)} | {md(paper.date or '')} | {md(paper.venue)} | <{html.escape(paper.link)}> |")
    (docs / "papers.md").write_text("\n".join(papers) + "\n", encoding="utf-8")
    return len(kb.methods) + 2
