"""`ptcompile paper add FILE.bib`: turn BibTeX entries into canonical paper records.

For each entry: derive the canonical key (first author's family name + year + first title word), the fields of
a Paper record and a canonical BibTeX entry; refuse a paper the catalogue already has (same key, arXiv id, DOI
or title); propose a category from the titles of the papers already in each category; validate the whole
taxonomy with the new records in a scratch copy; only then append to taxonomy/papers/<file>.yaml and .bib.
Nothing existing is rewritten: records are appended.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from . import schema
from .bibtex import BibEntry, parse_bibtex
from .errors import CompileError, TaxonomyError
from .knowledge_base import KnowledgeBase, normalise_title

MONTHS = {m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)}
STOP = {"a", "an", "the"}
TITLE_STOPWORDS = STOP | {"of", "for", "and", "in", "on", "with", "to", "via", "by", "from", "is", "are", "your", "large", "language", "models", "model", "llms", "llm"}


def _ascii_letters(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if ch.isascii() and ch.isalpha()).lower()


def _strip_tex(text: str) -> str:
    text = re.sub(r"\\[a-zA-Z]+\s*", "", text)  # \emph, \textit, ...
    return " ".join(text.replace("{", "").replace("}", "").split())


def split_authors(field: str) -> list[str]:
    """BibTeX 'Family, Given and Given Family and others' -> ['Given Family', ..., 'others']."""
    people = []
    for raw in re.split(r"\s+and\s+", _strip_tex(field)):
        raw = raw.strip()
        if not raw:
            continue
        if raw.lower() == "others":
            people.append("others")
        elif "," in raw:
            family, given = (part.strip() for part in raw.split(",", 1))
            people.append(f"{given} {family}".strip())
        else:
            people.append(raw)
    return people


def canonical_key(authors: list[str], year: str, title: str) -> str:
    family = _ascii_letters(authors[0].split()[-1]) if authors and authors[0] != "others" else "anonymous"
    words = [re.sub(r"[^a-z0-9]", "", w.lower()) for w in _strip_tex(title).split()]
    first = next((w for w in words if w and w not in STOP), "untitled")
    return f"{family or 'anonymous'}{year}{first}"


def arxiv_id(entry: BibEntry) -> str | None:
    for name in ("eprint", "journal", "url", "note"):
        match = re.search(r"(\d{4}\.\d{4,5})(v\d+)?", entry.fields.get(name, ""))
        if match and (name == "eprint" or "arxiv" in entry.fields.get(name, "").lower()):
            return match.group(1)
    return None


def record_from_bibtex(entry: BibEntry, category: str) -> dict[str, Any]:
    fields = entry.fields
    title = _strip_tex(fields.get("title", ""))
    authors = split_authors(fields.get("author", ""))
    year = re.sub(r"\D", "", fields.get("year", ""))[:4]
    arxiv = arxiv_id(entry)
    month = MONTHS.get(fields.get("month", "").strip().lower()[:3]) or (int(fields["month"]) if fields.get("month", "").strip().isdigit() else None)
    if arxiv:  # an arXiv id carries the month of first release: 2305.18290 -> 2023-05
        date = f"20{arxiv[:2]}-{arxiv[2:4]}"
    elif month:
        date = f"{year}-{month:02d}"
    else:
        date = None
    venue = _strip_tex(fields.get("booktitle") or fields.get("journal") or "")
    if not venue or venue.lower().startswith("arxiv"):
        venue = "arXiv" if arxiv else (venue or entry.entry_type)
    record: dict[str, Any] = {
        "key": canonical_key(authors, date[:4] if date else year, title),
        "title": title,
        "authors": authors[:16],
        "date": date,
        "venue": venue,
        "kind": "survey" if "survey" in title.lower() else "paper",
        "arxiv": arxiv,
        "doi": fields.get("doi") or None,
        "url": fields.get("url") if not arxiv and not fields.get("doi") else None,
        "categories": [category],
    }
    return {k: v for k, v in record.items() if v not in (None, [], "")}


def canonical_bibtex(record: dict[str, Any], entry_type: str) -> str:
    def family_given(name: str) -> str:
        if name == "others":
            return "others"
        parts = name.split()
        return f"{parts[-1]}, {' '.join(parts[:-1])}" if len(parts) > 1 else name

    kind = "inproceedings" if entry_type == "inproceedings" else ("misc" if entry_type == "misc" else "article")
    lines = [f"@{kind}{{{record['key']},", f"  title = {{{record['title']}}},"]
    if record.get("authors"):
        lines.append(f"  author = {{{' and '.join(family_given(a) for a in record['authors'])}}},")
    if kind == "inproceedings":
        lines.append(f"  booktitle = {{{record['venue']}}},")
    elif record.get("arxiv"):
        lines.append(f"  journal = {{arXiv preprint arXiv:{record['arxiv']}}},")
    elif record["venue"] != "arXiv":
        lines.append(f"  journal = {{{record['venue']}}},")
    lines.append(f"  year = {{{(record.get('date') or '')[:4]}}},")
    if record.get("arxiv"):
        lines += [f"  eprint = {{{record['arxiv']}}},", "  archivePrefix = {arXiv},"]
    if record.get("doi"):
        lines.append(f"  doi = {{{record['doi']}}},")
    if record.get("url"):
        lines.append(f"  howpublished = {{\\url{{{record['url']}}}}},")
    lines.append("}")
    return "\n".join(lines)


def propose_category(kb: KnowledgeBase, title: str) -> tuple[str, list[tuple[str, float]]]:
    """Score each category by how much the title's words overlap those of the papers already in it
    (idf-weighted), plus its own name and description. Returns the best and the ranking."""

    def words(text: str) -> set[str]:
        return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in TITLE_STOPWORDS and len(w) > 2}

    documents: dict[str, Counter] = {cid: Counter(words(e.record.name + " " + e.record.description)) for cid, e in kb.categories.items()}
    for entry in kb.papers.values():
        for cid in entry.record.categories:
            documents.setdefault(cid, Counter()).update(words(entry.record.title))
    frequency = Counter(w for doc in documents.values() for w in doc)
    query = words(title)
    scores = []
    for cid, doc in documents.items():
        total = sum(doc.values()) or 1
        score = sum(doc[w] / total * math.log(1 + len(documents) / frequency[w]) for w in query if w in doc)
        scores.append((cid, score))
    scores.sort(key=lambda kv: -kv[1])
    return scores[0][0], scores[:3]


def find_duplicate(kb: KnowledgeBase, record: dict[str, Any]) -> str | None:
    for key, entry in kb.papers.items():
        paper = entry.record
        if key == record["key"]:
            return f"key '{key}' is taken"
        if record.get("arxiv") and paper.arxiv == record["arxiv"]:
            return f"arXiv {paper.arxiv} is already catalogued as '{key}'"
        if record.get("doi") and paper.doi and paper.doi.lower() == record["doi"].lower():
            return f"DOI {paper.doi} is already catalogued as '{key}'"
        if normalise_title(paper.title) == normalise_title(record["title"]):
            return f"the title is already catalogued as '{key}'"
    return None


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.width = 4096  # one line per field: diffs stay readable
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def append_records(taxonomy: Path, stem: str, records: list[dict[str, Any]], bibtex: list[str]) -> tuple[Path, Path]:
    """Append (never rewrite): new list items at the end of papers/<stem>.yaml, new entries at the end of .bib."""
    import io

    yaml_path, bib_path = taxonomy / "papers" / f"{stem}.yaml", taxonomy / "papers" / f"{stem}.bib"
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    styled = []
    for record in records:  # the house style: quoted ids and dates, short lists in flow style
        item = CommentedMap()
        for name, value in record.items():
            if name in ("date", "arxiv", "title"):
                value = DoubleQuotedScalarString(value)
            elif isinstance(value, list):
                value = CommentedSeq(value)
                value.fa.set_flow_style()
            item[name] = value
        styled.append(item)
    buffer = io.StringIO()
    _yaml().dump({"papers": styled}, buffer)
    items = buffer.getvalue().split("\n", 1)[1]  # drop the "papers:" line; keep the "  - key: ..." items
    if yaml_path.exists():
        current = yaml_path.read_text(encoding="utf-8")
        yaml_path.write_text(current.rstrip("\n") + "\n" + items, encoding="utf-8")
    else:
        yaml_path.write_text("# yaml-language-server: $schema=../_schema/papers.schema.json\npapers:\n" + items, encoding="utf-8")
    existing = bib_path.read_text(encoding="utf-8").rstrip() + "\n\n" if bib_path.exists() else ""
    bib_path.write_text(existing + "\n\n".join(bibtex) + "\n", encoding="utf-8")
    return yaml_path, bib_path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ptcompile paper add", description="Add papers to the catalogue from a BibTeX file.")
    parser.add_argument("action", choices=["add"])
    parser.add_argument("bibtex", help="a .bib file (or - for standard input)")
    parser.add_argument("--category", help="category id (default: the proposed one)")
    parser.add_argument("--file", help="papers/<FILE>.yaml to append to (default: the category id)")
    parser.add_argument("--dry-run", action="store_true", help="print the records, write nothing")
    parser.add_argument("--taxonomy", metavar="DIR")
    args = parser.parse_args(argv)
    kb = KnowledgeBase.load(Path(args.taxonomy) if args.taxonomy else None)
    text = sys.stdin.read() if args.bibtex == "-" else Path(args.bibtex).read_text(encoding="utf-8")
    entries, problems = parse_bibtex(text, args.bibtex)
    if problems:
        raise TaxonomyError(problems, stage="files")
    if not entries:
        raise CompileError(f"{args.bibtex}: no BibTeX entries found")
    if args.category and args.category not in kb.categories:
        raise CompileError(f"unknown category '{args.category}' (see `ptcompile list categories`)")
    records, bibtex, seen = [], [], set()
    for entry in entries.values():
        proposed, ranking = propose_category(kb, entry.fields.get("title", ""))
        category = args.category or proposed
        record = record_from_bibtex(entry, category)
        duplicate = find_duplicate(kb, record)
        if duplicate or record["key"] in seen:
            raise CompileError(f"{entry.location}: {entry.key}: refusing a duplicate: {duplicate or 'twice in this file'}")
        seen.add(record["key"])
        try:
            schema.Paper.model_validate(record)
        except Exception as exc:  # pydantic ValidationError: show it located at the BibTeX entry
            raise CompileError(f"{entry.location}: {entry.key}: cannot make a valid record: {exc}") from None
        records.append(record)
        bibtex.append(canonical_bibtex(record, entry.entry_type))
        hint = ", ".join(f"{cid} ({score:.2f})" for cid, score in ranking)
        print(f"{record['key']}: category {category}" + ("" if args.category else f" (proposed; best matches: {hint})"), file=sys.stderr)
    stem = args.file or (args.category or records[0]["categories"][0])
    if args.dry_run:
        yaml = _yaml()
        yaml.dump({"papers": records}, sys.stdout)
        print("\n\n".join(bibtex))
        return 0
    # Validate the whole catalogue with the new records before touching the real files.
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "taxonomy"
        shutil.copytree(kb.root, copy)
        append_records(copy, stem, records, bibtex)
        KnowledgeBase.load(copy, kb.templates)
    yaml_path, bib_path = append_records(kb.root, stem, records, bibtex)
    print(f"added {len(records)} paper(s) to {yaml_path} and {bib_path}; run `ptcompile validate` and review the summary field")
    return 0
