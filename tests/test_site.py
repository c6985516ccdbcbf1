"""The reference site: built from the knowledge base, strict, offline, escaped, searchable; and in a browser.

The site is built into a temporary directory (the checkout's site/ skeleton + freshly written pages) and with
`mkdocs build --strict`, as `ptcompile build && cd site && mkdocs build --strict` does. Tests marked `browser`
drive Debian's headless Chromium through Playwright against the built site served on 127.0.0.1; they are part
of the default run (CI), and write screenshots to test-artifacts/site/.
"""

from __future__ import annotations

import html
import json
import posixpath
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from sitekit import ARTIFACTS, HOSTILE, SCHEME, URL_ATTRS, Server, build_site, html_pages, poison, read_page, shown

pytestmark = pytest.mark.xdist_group("site")

# The browser test searches for this word and must reach this method's page (KTO is named after Kahneman and
# Tversky's prospect theory; the record is taxonomy/methods/kto.yaml).
SEARCH_WORD, SEARCH_TARGET = "kahneman", "kto"
CPU_BUDGET_S = 30.0  # CPU seconds for the site build (pages + mkdocs); the wall-clock target is the same


def _method_url(method_id: str) -> str:
    return f"methods/{method_id}/"


@pytest.fixture(scope="module")
def site(kb, tmp_path_factory):
    return build_site(kb, tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def pages(site):
    return html_pages(site.build)


HOSTILE_METHODS = ("dpo", "sft")
HOSTILE_CATEGORY = "preference-optimization"


@pytest.fixture(scope="module")
def hostile_kb(kb):
    models = {kb.methods[m].record.default_model for m in HOSTILE_METHODS} | {"tiny"}
    return poison(kb, HOSTILE_METHODS, HOSTILE_CATEGORY, sorted(models), "lora" if "lora" in kb.peft else None)


# Tags whose number legitimately depends on the text: <span> (the script highlighter emits one per token, and a
# longer docstring wraps to more comment lines) and <option> (a new venue adds an entry to the paper filter).
SAME_TAGS_EXEMPT = {"span", "option"}


@pytest.fixture(scope="module")
def hostile_site(hostile_kb, tmp_path_factory):
    return build_site(hostile_kb, tmp_path_factory.mktemp("hostile-site"))


# ---------------------------------------------------------------------------------------------------------
# Escaping functions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", HOSTILE)
def test_escaping_functions(text):
    from ptcompile.site_pages import attr, code, external, fence, md, title_meta

    out = md(text)
    assert not set(out) & set("<>[]`*_{}|\\"), out
    assert "\n" not in out and "\x00" not in out and "\u202e" not in out and "\x02" not in out
    assert html.unescape(out) == shown(text)
    if shown(text) and not shown(text)[0].isalpha():
        assert out.startswith("&")  # block syntax (#, -, 1., !!!, ???) is inert at the start of a line
    value = attr(text)
    assert '"' not in value and "<" not in value and html.unescape(value) == shown(text)
    assert code(text) == f"<code>{out}</code>"
    assert html.unescape(json.loads(title_meta(text))) == shown(text) and "<" not in json.loads(title_meta(text))
    body = fence(text + "\n``````")
    ticks = re.match(r"`+", body).group(0)
    assert len(ticks) > 6 and body.endswith("\n" + ticks)
    assert "<a" not in external("javascript:alert(1)", text) and "<a" not in external('https://x.org/" onclick="y', text)


def test_highlighted_script_is_the_script():
    from ptcompile.site_pages import highlight_python

    source = (Path(__file__).resolve().parent.parent / "generated" / "train_dpo.py").read_text()
    fragment = highlight_python(source)
    inner = re.search(r"<code>(.*)</code>", fragment, re.S).group(1)
    assert html.unescape(re.sub(r"<[^>]+>", "", inner)) == source
    assert '<span class="k">def</span>' in fragment and '<span class="sd">"""' in fragment
    broken = highlight_python('x = """never closed\n<script>\n')
    assert "<script>" not in broken and "&lt;script&gt;" in broken


# ---------------------------------------------------------------------------------------------------------
# The built site
# ---------------------------------------------------------------------------------------------------------


def test_site_builds_strict_with_every_page(site, kb, pages):
    assert "WARNING" not in site.log and "ERROR" not in site.log, site.log
    expected = ["index.html", "guide/index.html", "papers/index.html", "hyperparameters/index.html", "datasets/index.html", "methods/index.html", "models/index.html", "categories/index.html"]
    expected += [f"methods/{m}/index.html" for m in kb.methods]
    expected += [f"categories/{c}/index.html" for c in kb.categories]
    expected += [f"models/{m}/index.html" for m in kb.models]
    expected += [f"peft/{p}/index.html" for p in kb.peft]
    missing = [p for p in expected if p not in pages]
    assert not missing, missing
    for method_id in kb.methods:
        assert pages[f"methods/{method_id}/index.html"].h1 == shown(kb.methods[method_id].record.name)
    print(f"site build: {len(pages)} pages, CPU {site.seconds_pages:.1f} s pages + {site.seconds_mkdocs:.1f} s mkdocs")
    assert site.seconds_pages + site.seconds_mkdocs < CPU_BUDGET_S


def _resolve(build: Path, page: str, target: str) -> tuple[Path | None, str]:
    parts = urlsplit(target)
    path = unquote(parts.path)
    if not path:
        return build / page, parts.fragment
    base = "" if path.startswith("/") else posixpath.dirname(page)  # 404.html links from the site root
    joined = posixpath.normpath(posixpath.join(base, path.lstrip("/")))
    candidate = build / joined if joined != "." else build
    if path.endswith("/") or candidate.is_dir():
        candidate = candidate / "index.html"
    return (candidate if candidate.is_file() else None), parts.fragment


def test_links_resolve_and_nothing_loads_from_another_host(site, pages):
    """Every relative link and anchor (Markdown and raw HTML alike) lands on an existing file and id; every
    resource (script, style, image, font, frame) is local; links to other sites are plain http(s)."""
    problems = []
    for page_path, page in pages.items():
        for element in page.elements:
            for name, value in element.attrs.items():
                if name not in URL_ATTRS or value is None:
                    continue
                scheme = SCHEME.match(value)
                is_resource = element.tag in ("script", "img", "iframe", "embed", "object", "source", "video", "audio") or (element.tag == "link" and name == "href")
                if scheme or value.startswith("//"):
                    if is_resource or (scheme and scheme.group(1).lower() not in ("http", "https", "mailto")):
                        problems.append(f"{page_path}: <{element.tag} {name}={value!r}>")
                    continue
                target, fragment = _resolve(site.build, page_path, value)
                if target is None:
                    problems.append(f"{page_path}: broken {name}={value!r}")
                elif fragment and target.suffix == ".html":
                    ids = pages[str(target.relative_to(site.build))].ids if str(target.relative_to(site.build)) in pages else read_page(target).ids
                    if unquote(fragment) not in ids:
                        problems.append(f"{page_path}: no #{fragment} in {target.relative_to(site.build)}")
    assert not problems, "\n".join(problems[:40])
    css = (site.build / "assets" / "katex" / "katex.min.css").read_text()
    for font in set(re.findall(r"url\((fonts/[^)]+\.woff2)\)", css)):
        assert (site.build / "assets" / "katex" / font).is_file(), font
    for path in site.build.rglob("*.css"):
        for url in re.findall(r"url\(\s*['\"]?([^'\")]+)", path.read_text(errors="replace")):
            assert not re.match(r"^(https?:)?//", url), f"{path}: {url}"


def test_search_index_finds_methods_papers_and_hyperparameters(site, kb):
    docs = json.loads((site.build / "search" / "search_index.json").read_text())["docs"]
    titles = {(d["location"], html.unescape(d["title"])) for d in docs}
    for method_id, entry in kb.methods.items():
        assert (_method_url(method_id), shown(entry.record.name)) in titles
    for key, entry in kb.papers.items():
        assert (f"papers/#{key}", shown(entry.record.title)) in titles, key
    names = {hp.record.name for hp in kb.common_training} | {hp.name for e in kb.methods.values() for hp in e.record.hyperparameters}
    for name in names:
        assert (f"hyperparameters/#{name}", name) in titles, name
    scripts = [d for d in docs if "def main(" in d["text"]]
    assert not scripts, "the generated scripts are not search text"


def test_method_page(site, kb, pages):
    from ptcompile.recipe import resolve

    method = kb.methods["dpo"].record
    page = pages["methods/dpo/index.html"]
    raw = (site.build / "methods" / "dpo" / "index.html").read_text()
    assert page.title.startswith(shown(method.name))
    latex = re.search(r'<div class="ptc-math ptc-display">(.*?)</div>', raw).group(1)
    assert html.unescape(latex) == shown(method.objective.latex)  # as text; KaTeX typesets it in the browser
    assert '<svg class="ptc-lineage"' in raw and 'class="ptc-node ptc-focus"' in raw
    resolved = resolve(kb, "dpo").hyperparameters
    for hp in resolved:
        assert f'href="../../hyperparameters/#{hp.name}"' in raw, hp.name
    assert raw.count('href="../../hyperparameters/#') == len(resolved)  # exactly the script's hyperparameters
    assert "ptcompile dpo --model qwen2.5-0.5b-instruct -o train_dpo.py" in html.unescape(raw)
    for model_id in kb.models:
        assert f"ptcompile dpo --model {model_id} -o train_dpo.py" in html.unescape(raw)
    script = (site.build / "scripts" / "train_dpo.py").read_text()
    assert script == (Path(__file__).resolve().parent.parent / "generated" / "train_dpo.py").read_text()
    assert 'class="ptc-script"' not in raw and html.unescape(re.sub(r"<[^>]+>", "", raw)).count(script.splitlines()[-1]) >= 1
    assert '<span class="k">def</span> <span class="nf">main</span>' in raw


def test_paper_index(site, kb, pages):
    page = pages["papers/index.html"]
    raw = (site.build / "papers" / "index.html").read_text()
    for key in kb.papers:
        assert key in page.ids, key
    assert raw.count('<details class="ptc-bibtex">') == sum(1 for k in kb.papers if k in kb.bibtex)
    options = {(e.attrs.get("value")) for e in page.elements if e.tag == "option"}
    years = {p.record.date[:4] for p in kb.papers.values() if p.record.date}
    assert years <= options
    categories = {c for p in kb.papers.values() for c in p.record.categories}
    assert categories <= options


def test_guide_places_every_method(site, kb):
    from ptcompile.site_pages import situation

    raw = (site.build / "guide" / "index.html").read_text()
    sections = re.split(r'<h3 id="', raw)
    for method_id, entry in kb.methods.items():
        where = situation(entry.record)
        section = next(s for s in sections if s.startswith(f'{where}"'))
        assert f'href="../methods/{method_id}/"' in section, (method_id, where)


# ---------------------------------------------------------------------------------------------------------
# Hostile text renders as text
# ---------------------------------------------------------------------------------------------------------


def test_hostile_text_renders_as_text(site, pages, hostile_site, hostile_kb):
    """Every free-text field of two methods, their papers and BibTeX, a category, models, datasets and a PEFT
    technique holds <script>, raw HTML, Markdown links and images, attribute lists, admonition and list syntax,
    control and bidi characters. The strict build still passes; every page has exactly the elements of the clean
    site (no tag was injected; see SAME_TAGS_EXEMPT for the two data-dependent ones); no attribute is an
    event handler, no URL is javascript:; and the hostile strings show as text."""
    hostile = html_pages(hostile_site.build)
    assert set(hostile) == set(pages)
    for path, page in hostile.items():
        clean = Counter(e.tag for e in pages[path].elements if e.tag not in SAME_TAGS_EXEMPT)
        dirty = Counter(e.tag for e in page.elements if e.tag not in SAME_TAGS_EXEMPT)
        assert dirty == clean, f"{path}: {dirty - clean} injected, {clean - dirty} lost"
        for element in page.elements:
            for name, value in element.attrs.items():
                assert not name.startswith("on"), f"{path}: <{element.tag} {name}={value!r}>"
                if name in URL_ATTRS and value:
                    assert not re.match(r"^\s*(javascript|data|vbscript):", value, re.I), f"{path}: {value!r}"
            if element.tag == "script":
                assert "__ptc_pwned" not in element.text, path
    for method_id in HOSTILE_METHODS:
        record = hostile_kb.methods[method_id].record
        page = hostile[f"methods/{method_id}/index.html"]
        assert page.h1 == shown(record.name)
        assert page.title == f"{shown(record.name)} - ptcompile"
        paper = hostile_kb.papers[record.papers[0]].record
        raw = (hostile_site.build / "papers" / "index.html").read_text()
        heading = re.search(rf'<h3 id="{paper.key}">(.*?)</h3>', raw).group(1)
        assert html.unescape(heading) == shown(paper.title)
    category = hostile_kb.categories[HOSTILE_CATEGORY].record
    assert hostile[f"categories/{HOSTILE_CATEGORY}/index.html"].h1 == shown(category.name)


# ---------------------------------------------------------------------------------------------------------
# In a browser
# ---------------------------------------------------------------------------------------------------------

COPY_BUTTON = "button[data-md-type='copy']"  # the theme's copy-to-clipboard button on a code block
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


class Browser:
    """Headless Debian Chromium (Playwright) that records console errors, failed and off-site requests."""

    def __init__(self):
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        if not Path(chromium).is_file():
            pytest.fail("Debian's chromium is missing: `apt-get install -y chromium` (`make test` installs it)")
        from playwright.sync_api import sync_playwright

        self.profile = tempfile.mkdtemp(prefix="ptc-chromium-")  # an empty --user-data-dir
        self.playwright = sync_playwright().start()
        self.context = self.playwright.chromium.launch_persistent_context(
            self.profile, executable_path=chromium, headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900}
        )
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.context.route("**/*", self._route)
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.on("console", lambda msg: self.errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("response", lambda r: self.errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    @staticmethod
    def _route(route):
        host = urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            route.abort()  # recorded by the request listener; the test fails on it

    def reset(self) -> None:
        self.errors.clear()
        self.requests.clear()
        self.dialogs.clear()

    def off_site(self) -> list[str]:
        return [u for u in self.requests if urlsplit(u).hostname not in ("127.0.0.1", "localhost")]

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_load_state("networkidle")

    def shot(self, name: str, full_page: bool = False) -> Path:
        target = ARTIFACTS / "site" / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.page.wait_for_timeout(400)  # let the header's title transition settle after a scroll
        self.page.screenshot(path=str(target), full_page=full_page)
        return target

    def close(self) -> None:
        self.context.close()
        self.playwright.stop()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.mark.browser
def test_browser_home_method_and_papers(site, kb, browser):
    server = Server(site.build)
    browser.reset()
    try:
        page = browser.page
        browser.open(server.url)
        assert _h1(page) == "ptcompile"
        assert page.locator(".md-typeset a[href='categories/preference-optimization/']").count() >= 1  # the tree
        browser.shot("home")

        browser.open(server.url + "methods/dpo/")
        assert page.locator(".ptc-math .katex-display").count() == 1, "KaTeX did not typeset the objective"
        assert page.locator(".ptc-math .katex-error").count() == 0
        assert page.evaluate("document.fonts.check('16px KaTeX_Main')")
        assert page.locator("svg.ptc-lineage .ptc-focus").count() == 1
        assert page.locator(f"#compile + div.highlight {COPY_BUTTON}").count() >= 1, "no copy button on the compile command"
        page.locator("details > summary", has_text="train_dpo.py").first.click()
        assert page.locator("details[open] .highlight code").first.inner_text().startswith('"""')
        page.locator("#objective").scroll_into_view_if_needed()
        browser.shot("method-dpo")

        browser.open(server.url + "papers/")
        total = page.locator(".ptc-paper").count()
        assert total == len(kb.papers)
        page.select_option("#ptc-paper-filters select[name=category]", "preference-optimization")
        visible = page.locator(".ptc-paper:not([hidden])")
        expected = sum(1 for p in kb.papers.values() if any(c == "preference-optimization" or "preference-optimization" in _ancestors(kb, c) for c in p.record.categories))
        assert visible.count() == expected and 0 < expected < total
        assert "category=preference-optimization" in page.url
        year = kb.papers["rafailov2023direct"].record.date[:4]
        page.select_option("#ptc-paper-filters select[name=year]", year)
        assert page.locator("#rafailov2023direct").is_visible()
        assert all(y == year for y in visible.evaluate_all("els => els.map(e => e.dataset.year)"))
        entry = page.locator(".ptc-paper", has=page.locator("#rafailov2023direct"))
        entry.locator("summary", has_text="BibTeX").click()
        assert entry.locator("pre code").inner_text().startswith("@")
        assert entry.locator(COPY_BUTTON).count() == 1, "no copy button on the BibTeX"
        entry.scroll_into_view_if_needed()
        browser.shot("papers-bibtex")
        page.evaluate("window.scrollTo(0, 0)")
        browser.shot("papers-filtered")

        assert not browser.errors, browser.errors
        assert not browser.off_site(), browser.off_site()
        assert browser.requests and all(u.startswith(server.url) for u in browser.requests)
    finally:
        server.stop()


@pytest.mark.browser
def test_browser_search_reaches_the_kto_page(site, kb, browser):
    """Search for 'kahneman' (KTO is named after Kahneman and Tversky's prospect theory) and reach KTO's page."""
    if SEARCH_TARGET not in kb.methods:
        pytest.fail(f"no method '{SEARCH_TARGET}' in this taxonomy: its record (taxonomy/methods/{SEARCH_TARGET}.yaml) comes with the unpaired (KTO) work package")
    server = Server(site.build)
    browser.reset()
    try:
        page = browser.page
        browser.open(server.url)
        _search(page, SEARCH_WORD)
        hit = page.locator(f".md-search-result__item > a[href*='/{_method_url(SEARCH_TARGET)}']").first
        hit.wait_for(state="visible", timeout=20_000)
        browser.shot("search-kahneman")
        hit.click()
        page.wait_for_url(f"**/{_method_url(SEARCH_TARGET)}**")
        page.wait_for_load_state("networkidle")
        assert _h1(page) == kb.methods[SEARCH_TARGET].record.name
        browser.shot("method-kto")
        page.locator("#lineage").scroll_into_view_if_needed()
        browser.shot("method-kto-lineage")
        assert not browser.errors, browser.errors
        assert not browser.off_site(), browser.off_site()
        assert all(u.startswith(server.url) for u in browser.requests)
    finally:
        server.stop()


def _search(page, word: str) -> None:
    """Type into the theme's search box key by key (its search runs on key events, not on a pasted value)."""
    box = page.locator("input.md-search__input")
    box.click()
    box.press_sequentially(word, delay=40)


def _h1(page) -> str:
    return page.locator("h1").first.inner_text().replace("¶", "").strip()  # without the permalink sign


def _ancestors(kb, cid):
    out, node = [], kb.categories[cid].record.parent
    while node:
        out.append(node)
        node = kb.categories[node].record.parent
    return out


@pytest.mark.browser
def test_browser_hostile_text_does_not_run(hostile_site, hostile_kb, browser):
    server = Server(hostile_site.build)
    browser.reset()
    try:
        page = browser.page
        paths = ["", f"methods/{HOSTILE_METHODS[0]}/", f"methods/{HOSTILE_METHODS[1]}/", "papers/", f"categories/{HOSTILE_CATEGORY}/", "guide/", "hyperparameters/", "datasets/", "models/qwen2.5-0.5b-instruct/", "peft/lora/"]
        for path in paths:
            browser.open(server.url + path)
            page.mouse.move(400, 400)
            for summary in page.locator("summary").all()[:5]:
                summary.click()
            assert page.evaluate("window.__ptc_pwned") is None, path
        browser.open(server.url + f"methods/{HOSTILE_METHODS[0]}/")
        assert _h1(page) == shown(hostile_kb.methods[HOSTILE_METHODS[0]].record.name)
        browser.shot("hostile-method")
        _search(page, "heading")  # a word of the hostile "# heading !!! danger ..." line
        page.locator(".md-search-result__item").first.wait_for(state="visible", timeout=20_000)
        page.wait_for_timeout(300)
        browser.shot("hostile-search")
        assert page.evaluate("window.__ptc_pwned") is None
        assert not browser.dialogs, browser.dialogs
        assert not [e for e in browser.errors if "HTTP" in e or "page error" in e], browser.errors
        assert not browser.off_site(), browser.off_site()
    finally:
        server.stop()
