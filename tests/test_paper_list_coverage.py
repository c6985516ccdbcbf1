"""Every link in the survey's paper list must be findable in the catalogue.

The fixture `tests/data/awesome-llm-post-training-README.md` is a snapshot of the paper list that accompanies the
survey arXiv 2502.21321. From the line `# 📖 Papers` down to `## 📌 Contributing`, every content link (papers,
repositories, courses, web resources) must match some catalogued record: its arXiv id, DOI, url, code or one of
its `links`. Both sides go through the same normalisation, so `arxiv.org/pdf/2412.03704`,
`www.arxiv.org/abs/2412.03704v2` and `http://arxiv.org/abs/2412.03704` all count as arXiv 2412.03704, and an
OpenReview link matches whether or not the list appends `#discussion` or `&noteId=...`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from ptcompile.knowledge_base import KnowledgeBase
from ptcompile.schema import Paper

PAPER_LIST = Path(__file__).parent / "data" / "awesome-llm-post-training-README.md"
SECTION_START = "# 📖 Papers"
SECTION_END = "## 📌 Contributing"

# A markdown link target: `[text](https://...)` or `![alt](https://...)`; in-page anchors `(#...)` never match.
MARKDOWN_LINK = re.compile(r"\]\((https?://[^\s)]+)\)")
# Images and badges, not content.
SKIPPED_HOSTS = {"img.shields.io", "i.imgur.com", "api.star-history.com", "star-history.com"}
# abs/pdf/html pages, with or without www., http, a version suffix or `.pdf`. The id part is deliberately loose
# (`[0-9]+` after the dot) so a broken id in the list (e.g. `2502.143`) still normalises the same way on both sides.
ARXIV_URL = re.compile(
    r"^(?:www\.|export\.)?arxiv\.org/(?:abs|pdf|html)/([0-9]{4}\.[0-9]+)(?:v[0-9]+)?(?:\.pdf)?$", re.IGNORECASE
)
# Query parameters that only point inside a page (OpenReview's comment anchors).
NOISE_PARAMS = {"noteid"}


class ListLink(NamedTuple):
    line: int
    url: str


def paper_list_section(text: str) -> list[tuple[int, str]]:
    """The numbered lines from `# 📖 Papers` (inclusive) to `## 📌 Contributing` (exclusive)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == SECTION_START)
    end = next(i for i, line in enumerate(lines) if i > start and line.strip().startswith(SECTION_END))
    return [(i + 1, lines[i]) for i in range(start, end)]


def extract_links(numbered_lines: Iterable[tuple[int, str]]) -> list[ListLink]:
    """Content links in the given lines, in order; badges and images are left out."""
    links = []
    for number, line in numbered_lines:
        for url in MARKDOWN_LINK.findall(line):
            if urlsplit(url).hostname not in SKIPPED_HOSTS:
                links.append(ListLink(number, url))
    return links


def normalise_link(url: str) -> str:
    """A comparable form of a link: `arxiv:<id>`, `doi:<doi>`, or `host/path?query` without noise."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    path = parts.path.rstrip("/")
    arxiv = ARXIV_URL.match(f"{host}{path}")
    if arxiv:
        return f"arxiv:{arxiv.group(1)}"
    if host in ("doi.org", "dx.doi.org"):
        return f"doi:{path.lstrip('/').lower()}"
    host = host.removeprefix("www.")
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in NOISE_PARAMS])
    return f"{host}{path}" + (f"?{query}" if query else "")


def paper_links(paper: Paper) -> set[str]:
    """Every normalised address under which one catalogued record can be found."""
    found = {normalise_link(u) for u in [paper.url, paper.code, *paper.links] if u}
    if paper.arxiv:
        found.add(f"arxiv:{paper.arxiv}")
    if paper.doi:
        found.add(f"doi:{paper.doi.lower()}")
    return found


def catalogue_links(papers: Iterable[Paper]) -> set[str]:
    return set().union(*(paper_links(p) for p in papers))


def missing_links(links: Iterable[ListLink], catalogue: set[str]) -> list[ListLink]:
    return [link for link in links if normalise_link(link.url) not in catalogue]


def describe(missing: list[ListLink]) -> str:
    shown = "\n".join(f"  line {link.line}: {link.url}  (looked up as {normalise_link(link.url)})" for link in missing)
    return f"{len(missing)} link(s) of the paper list are not in the catalogue:\n{shown}"


# --------------------------------------------------------------------------------------------------------------


def test_every_paper_list_link_is_catalogued() -> None:
    kb = KnowledgeBase.load()
    links = extract_links(paper_list_section(PAPER_LIST.read_text(encoding="utf-8")))
    assert len(links) > 150, "the paper list fixture looks truncated"
    missing = missing_links(links, catalogue_links(entry.record for entry in kb.papers.values()))
    assert not missing, describe(missing)


FAKE_LIST = """\
# Some survey
[not in range](https://example.org/before)

# 📖 Papers
* A paper [[Paper]](https://arxiv.org/pdf/2401.00001v2) ![](https://img.shields.io/badge/arXiv-2024.01-red)
* Another [[Paper]](http://www.arxiv.org/abs/2401.00002) and [in-page](#contents)
* A forum paper [[Paper]](https://openreview.net/forum?id=AbC123&noteId=xyz) [[again]](https://OpenReview.net/forum?id=AbC123#discussion)
* Missing one [[Paper]](https://arxiv.org/abs/2401.99999)
| 1 | [**Repo**](https://github.com/Owner/Repo/) | a table row |

## 📌 Contributing
[not in range](https://example.org/after)
"""


def fake_paper(key: str, **identifiers: object) -> Paper:
    return Paper.model_validate(
        {"key": key, "title": key, "date": "2024-01", "venue": "arXiv", "categories": ["surveys"], **identifiers}
    )


def test_a_link_missing_from_the_catalogue_is_reported() -> None:
    papers = [
        fake_paper("one2024a", arxiv="2401.00001"),
        fake_paper("two2024b", arxiv="2401.00002"),
        fake_paper("three2024c", url="https://openreview.net/forum?id=AbC123"),
        fake_paper("repo2024repo", kind="repository", url="https://github.com/Owner/Repo"),
    ]
    links = extract_links(paper_list_section(FAKE_LIST))
    assert [link.url for link in links] == [
        "https://arxiv.org/pdf/2401.00001v2",
        "http://www.arxiv.org/abs/2401.00002",
        "https://openreview.net/forum?id=AbC123&noteId=xyz",
        "https://OpenReview.net/forum?id=AbC123#discussion",
        "https://arxiv.org/abs/2401.99999",
        "https://github.com/Owner/Repo/",
    ]
    missing = missing_links(links, catalogue_links(papers))
    assert missing == [ListLink(8, "https://arxiv.org/abs/2401.99999")]
    assert "line 8: https://arxiv.org/abs/2401.99999" in describe(missing)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://arxiv.org/abs/2305.18290", "arxiv:2305.18290"),
        ("https://arxiv.org/abs/2503.00555v1", "arxiv:2503.00555"),
        ("https://arxiv.org/pdf/2412.03704", "arxiv:2412.03704"),
        ("https://arxiv.org/pdf/2412.03704v2.pdf", "arxiv:2412.03704"),
        ("https://www.arxiv.org/abs/2509.25541", "arxiv:2509.25541"),
        ("http://arxiv.org/abs/2309.10444", "arxiv:2309.10444"),
        ("https://arxiv.org/abs/2502.143", "arxiv:2502.143"),
        ("https://doi.org/10.18653/v1/2022.findings-acl.19", "doi:10.18653/v1/2022.findings-acl.19"),
        ("https://aclanthology.org/2022.findings-acl.19/", "aclanthology.org/2022.findings-acl.19"),
        ("https://openreview.net/forum?id=kh9Zt2Ldmn#discussion", "openreview.net/forum?id=kh9Zt2Ldmn"),
        ("https://openreview.net/forum?id=CVpuVe1N22&noteId=aTI8PGpO47", "openreview.net/forum?id=CVpuVe1N22"),
        ("https://openreview.net/pdf?id=ThjDCZOljE", "openreview.net/pdf?id=ThjDCZOljE"),
        ("https://sites.google.com/view/deep-rl-bootcamp/", "sites.google.com/view/deep-rl-bootcamp"),
        ("https://neurips.cc", "neurips.cc"),
    ],
)
def test_normalise_link(url: str, expected: str) -> None:
    assert normalise_link(url) == expected
