"""Helpers for the site tests: build the site anywhere, serve it, poison the knowledge base, read the HTML."""

from __future__ import annotations

import copy
import functools
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "site"
ARTIFACTS = ROOT / "test-artifacts"


@dataclass
class BuiltSite:
    directory: Path  # holds mkdocs.yml, docs/, build/
    log: str
    seconds_pages: float  # CPU seconds of write_site (this process)
    seconds_mkdocs: float  # CPU seconds of the mkdocs subprocess

    @property
    def build(self) -> Path:
        return self.directory / "build"


def build_site(kb, directory: Path) -> BuiltSite:
    """`ptcompile build`'s site step and `mkdocs build --strict`, into `directory` (not the checkout's site/)."""
    import resource

    from ptcompile.site_pages import write_site

    start = time.process_time()
    write_site(kb, directory, skeleton=SITE)
    pages = time.process_time() - start
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(directory / "mkdocs.yml")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return BuiltSite(directory, log, pages, cpu)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


class Server:
    """The built site on http://127.0.0.1:PORT/ (a thread; stop() when done)."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------------------
# Hostile text
# ---------------------------------------------------------------------------------------------------------

# Each payload sets window.__ptc_pwned (or a dialog) if it ever runs; rendered as text it does nothing.
HOSTILE = [
    '<script>window.__ptc_pwned = "script"</script>',
    '<img src="x" onerror="window.__ptc_pwned = \'img\'">',
    '[click me](javascript:window.__ptc_pwned="link")',
    "![img](http://example.com/x.png) <http://example.com/auto>",
    '**bold** _em_ `code` <b>raw</b> {: onclick="window.__ptc_pwned=1" }',
    "| a | b | <!-- comment --> &amp; &lt;",
    '# heading\n!!! danger "boom"\n??? note\n- list\n1. item\n    indented',
    '</title><script>window.__ptc_pwned="title"</script>',
    '" onmouseover="window.__ptc_pwned=\'attr\'" x="',
    "\\(\\alpha\\) $x$ \\href{javascript:alert(1)}{x} \\includegraphics{http://example.com/i.png}",
    "nul\x00 stx\x02wzxhzdk:0\x03 bidi \u202eevil\u202c line\u2028sep",
    "```\nfence\n```",
]


def hostile_strings():
    import itertools

    return itertools.cycle(HOSTILE)


def _text_update(record, fields, strings):
    update = {}
    for name in fields:
        value = getattr(record, name)
        if isinstance(value, str):
            update[name] = next(strings)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            update[name] = [next(strings) for _ in value]
        elif isinstance(value, dict):
            update[name] = {k: next(strings) for k in value}
    return record.model_copy(update=update)


def poison(kb, method_ids, category_id: str, model_ids, peft_id: str | None):
    """A copy of the knowledge base whose methods (and their papers, hyperparameters), a category, models, the
    methods' default datasets, a PEFT technique and the papers' BibTeX carry hostile text."""
    from ptcompile.bibtex import BibEntry
    from ptcompile.knowledge_base import Entry

    strings = hostile_strings()
    bad = copy.copy(kb)
    bad.methods, bad.papers, bad.models, bad.datasets = dict(kb.methods), dict(kb.papers), dict(kb.models), dict(kb.datasets)
    bad.categories, bad.peft, bad.bibtex = dict(kb.categories), dict(kb.peft), dict(kb.bibtex)
    for method_id in method_ids:
        method = kb.methods[method_id].record
        hyperparameters = []
        for hp in method.hyperparameters:
            source = hp.source.model_copy(update={"where": next(strings)} if hp.source.where else {"common_practice": next(strings)})
            hyperparameters.append(hp.model_copy(update={"description": next(strings), "source": source}))
        objective = _text_update(method.objective, ["latex", "plain", "equation"], strings)
        method = _text_update(method, ["name", "aliases", "summary", "pitfalls", "frameworks"], strings)
        method = method.model_copy(update={"objective": objective, "hyperparameters": hyperparameters})
        bad.methods[method_id] = Entry(method, kb.methods[method_id].doc, ())
        for key in method.papers:
            bad.papers[key] = Entry(_text_update(kb.papers[key].record, ["title", "authors", "venue", "summary"], strings), kb.papers[key].doc, ())
            if key in kb.bibtex:
                old = kb.bibtex[key]
                bad.bibtex[key] = BibEntry(old.key, old.entry_type, old.fields, old.raw + "\n% </code></pre>" + next(strings), old.location)
        dataset_id = method.default_dataset
        bad.datasets[dataset_id] = Entry(_text_update(kb.datasets[dataset_id].record, ["name", "license", "description"], strings), kb.datasets[dataset_id].doc, ())
    category = _text_update(kb.categories[category_id].record, ["name", "description", "survey_section"], strings)
    bad.categories[category_id] = Entry(category, kb.categories[category_id].doc, ())
    for model_id in model_ids:
        bad.models[model_id] = Entry(_text_update(kb.models[model_id].record, ["name", "license", "config_source"], strings), kb.models[model_id].doc, ())
    if peft_id is not None:
        peft = kb.peft[peft_id].record
        hps = [hp.model_copy(update={"description": next(strings)}) for hp in peft.hyperparameters]
        peft = _text_update(peft, ["name", "summary", "pitfalls"], strings).model_copy(update={"hyperparameters": hps})
        bad.peft[peft_id] = Entry(peft, kb.peft[peft_id].doc, ())
    return bad


# ---------------------------------------------------------------------------------------------------------
# Reading the built HTML
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    text: str = ""


@dataclass
class Page:
    path: Path
    elements: list[Element] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    h1: str = ""
    title: str = ""


class _Collector(HTMLParser):
    def __init__(self, page: Page):
        super().__init__(convert_charrefs=True)
        self.page = page
        self.stack: list[Element] = []
        self.in_h1 = 0
        self.in_title = 0
        self.in_script: Element | None = None

    def handle_starttag(self, tag, attrs):
        element = Element(tag, dict(attrs))
        self.page.elements.append(element)
        if element.attrs.get("id"):
            self.page.ids.add(element.attrs["id"])
        if tag == "a" and element.attrs.get("name"):
            self.page.ids.add(element.attrs["name"])
        if tag == "h1":
            self.in_h1 += 1
        if tag == "title" and not self.page.title and not any(e.tag == "body" for e in self.page.elements):
            self.in_title += 1  # the document's <title> (not an SVG <title> in the body)
        if tag == "script":
            self.in_script = element

    def handle_endtag(self, tag):
        if tag == "h1" and self.in_h1:
            self.in_h1 -= 1
        if tag == "title" and self.in_title:
            self.in_title -= 1
        if tag == "script":
            self.in_script = None

    def handle_data(self, data):
        if self.in_h1:
            self.page.h1 += data
        if self.in_title:
            self.page.title += data
        if self.in_script is not None:
            self.in_script.text += data


def read_page(path: Path) -> Page:
    page = Page(path)
    parser = _Collector(page)
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    page.h1 = " ".join(page.h1.replace("¶", " ").split())
    page.title = " ".join(page.title.split())
    return page


def html_pages(build: Path) -> dict[str, Page]:
    return {str(p.relative_to(build)): read_page(p) for p in sorted(build.rglob("*.html")) if "assets" not in p.relative_to(build).parts}


def shown(text: str) -> str:
    """How the site shows a taxonomy string: one line, invisible characters as escapes (site_pages._visible)."""
    from ptcompile.site_pages import _visible

    return _visible(text)


URL_ATTRS = {"href", "src", "action", "formaction", "xlink:href", "data", "poster", "srcset"}
SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*):")
