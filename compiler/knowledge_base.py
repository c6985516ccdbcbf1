"""Load the whole taxonomy, validate every file and every cross-reference, and report all problems at once.

Layout of a taxonomy directory (one kind of record per place, so a contributor knows where things go):

    categories.yaml          the category tree (mirrors the survey's taxonomy and the paper list's sections)
    training.yaml            training hyperparameters shared by every method of a script family
    papers/<section>.yaml    papers, surveys and repositories (lists), with BibTeX in papers/<section>.bib
    methods/<id>.yaml        one post-training method per file
    peft/<id>.yaml           one parameter-efficient fine-tuning technique per file
    models/<id>.yaml         one model preset per file
    datasets/<id>.yaml       one dataset preset per file
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Iterable, TypeVar

from pydantic import ValidationError

from . import schema
from .bibtex import BibEntry, parse_bibtex_file
from .errors import Location, Problem, TaxonomyError, display_path
from .paths import taxonomy_dir, templates_dir
from .yaml_source import PathKey, YamlDocument, format_loc, load_yaml

T = TypeVar("T", bound=schema.Strict)

# Which data formats each script family can train on.
FAMILY_FORMATS: dict[str, set[str]] = {
    "sft": {"chat", "instruction", "text"},
    "preference": {"preference"},
    "unpaired": {"unpaired", "preference"},
    "reward": {"preference"},
    "prm": {"step-labels"},
    "distill": {"chat", "instruction"},
    "rejection-sampling": {"prompt"},
    "constitutional": {"prompt"},
    "policy-gradient": {"prompt"},
    "ppo": {"prompt"},
    "online-preference": {"prompt", "chat"},
    "gkd": {"chat", "prompt"},
    "inference": {"prompt"},
}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A validated record and where it was written."""

    record: T
    doc: YamlDocument
    loc: PathKey

    def where(self, *sub: Any) -> Location:
        return self.doc.location(self.loc + sub)



def _pydantic_problems(exc: ValidationError, doc: YamlDocument, prefix: PathKey) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = _data_path(doc.data, prefix, tuple(error["loc"]), error["type"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see the JSON Schema in taxonomy/_schema/)"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
            # Validators name the field they are about as "field: message"; point at that field.
            head, _, rest = message.partition(": ")
            record = _lookup_data(doc.data, prefix + loc)
            if rest and isinstance(record, dict) and head in record:
                loc, message = loc + (head,), rest
        if error["type"] in ("float_type", "int_type", "string_type", "bool_type") and "input" in error:
            message += f" (got {type(error['input']).__name__} {_short_repr(error['input'])})"
        full = prefix + loc
        problems.append(Problem(doc.location(full, prefer_key=error["type"] == "extra_forbidden"), format_loc(full), message))
    return problems


def _short_repr(value: Any, limit: int = 80) -> str:
    """repr() cut to `limit` characters: a wrong value may be a 100 kB string or a list of thousands."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deep to show>"
    return text if len(text) <= limit else text[: limit - 5] + " ...>"


def _lookup_data(data: Any, path: PathKey) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _data_path(data: Any, prefix: PathKey, loc: PathKey, error_type: str) -> PathKey:
    """Drop pydantic's union-member tags from `loc`, keeping the parts that exist in the YAML data."""
    current = data
    for part in prefix:
        current = current[part] if isinstance(current, (dict, list)) else None
    kept: list[Any] = []
    for index, part in enumerate(loc):
        if isinstance(current, dict) and isinstance(part, str):
            if part in current:
                kept.append(part)
                current = current[part]
                continue
            if error_type == "missing" and index == len(loc) - 1:
                kept.append(part)
            continue
        if isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            kept.append(part)
            current = current[part]
            continue
        # a scalar: the remaining parts are union tags or the dict-key marker
        continue
    return tuple(kept)


class KnowledgeBase:
    """The validated, cross-referenced catalogue. Build it with `KnowledgeBase.load()`."""

    def __init__(self, root: Path, templates: Path):
        self.root = root
        self.templates = templates
        self.categories: dict[str, Entry[schema.Category]] = {}
        self.papers: dict[str, Entry[schema.Paper]] = {}
        self.bibtex: dict[str, BibEntry] = {}
        self.methods: dict[str, Entry[schema.Method]] = {}
        self.peft: dict[str, Entry[schema.PeftTechnique]] = {}
        self.models: dict[str, Entry[schema.ModelPreset]] = {}
        self.datasets: dict[str, Entry[schema.DatasetPreset]] = {}
        self.common_training: list[Entry[schema.Hyperparameter]] = []
        self.family_training: dict[str, list[Entry[schema.Hyperparameter]]] = {}
        self.files: list[Path] = []
        self.duplicates: list[Problem] = []  # repeated ids/keys: reported with the cross-reference problems

    # ---------------------------------------------------------------------------------------------
    # Loading
    # ---------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, root: Path | None = None, templates: Path | None = None) -> "KnowledgeBase":
        """Load and check everything; raise TaxonomyError listing every problem found."""
        kb = cls((root or taxonomy_dir()).resolve(), (templates or templates_dir()).resolve())
        problems = kb._load_files()
        if problems:
            raise TaxonomyError(problems, stage="files")
        problems = kb._check_references()
        if problems:
            raise TaxonomyError(problems, stage="references")
        return kb

    def _shown(self, path: Path) -> str:
        return display_path(path, self.root.parent)

    def _load_files(self) -> list[Problem]:
        problems: list[Problem] = []
        if not self.root.is_dir():
            return [Problem(Location(str(self.root), 1, 1), "-", "taxonomy directory not found")]
        expected_dirs = {"papers", "methods", "peft", "models", "datasets", "_schema"}
        for path in sorted(self.root.rglob("*")):
            if path.is_dir() or path.name.startswith(".") or path.name == "README.md":
                continue
            rel = path.relative_to(self.root)
            if rel.parts[0] == "_schema":
                continue
            self.files.append(path)
            shown = self._shown(path)
            if len(rel.parts) == 1:
                if rel.name == "categories.yaml":
                    problems += self._load_categories(path)
                elif rel.name == "training.yaml":
                    problems += self._load_training(path)
                else:
                    problems.append(Problem(Location(shown, 1, 1), "-", "unexpected file at the taxonomy root"))
                continue
            folder = rel.parts[0]
            if folder not in expected_dirs or len(rel.parts) != 2:
                problems.append(Problem(Location(shown, 1, 1), "-", f"unexpected location; taxonomy folders are {sorted(expected_dirs - {'_schema'})}"))
                continue
            if folder == "papers" and path.suffix == ".bib":
                problems += self._load_bib(path)
            elif path.suffix == ".yaml":
                problems += {"papers": self._load_papers, "methods": self._load_single, "peft": self._load_single, "models": self._load_single, "datasets": self._load_single}[folder](path)
            else:
                problems.append(Problem(Location(shown, 1, 1), "-", "expected a .yaml file (or .bib under papers/)"))
        for required in ("categories.yaml", "training.yaml"):
            if not (self.root / required).is_file():
                problems.append(Problem(Location(self._shown(self.root / required), 1, 1), "-", "required file is missing"))
        return problems

    def _validate(self, path: Path, model: type[T]) -> tuple[T | None, YamlDocument | None, list[Problem]]:
        doc, problems = load_yaml(path, self._shown(path))
        if doc is None:
            return None, None, problems
        if not isinstance(doc.data, dict):
            return None, doc, [Problem(doc.location(()), "-", "the file must hold a mapping (key: value pairs)")]
        try:
            return model.model_validate(doc.data), doc, []
        except ValidationError as exc:
            return None, doc, _pydantic_problems(exc, doc, ())

    def _load_categories(self, path: Path) -> list[Problem]:
        record, doc, problems = self._validate(path, schema.CategoriesFile)
        if record is not None and doc is not None:
            for i, cat in enumerate(record.categories):
                entry = Entry(cat, doc, ("categories", i))
                if cat.id in self.categories:
                    self.duplicates.append(Problem(entry.where("id"), f"categories[{i}].id", f"duplicate category id '{cat.id}' (first at {self.categories[cat.id].where('id')})"))
                else:
                    self.categories[cat.id] = entry
        return problems

    def _load_training(self, path: Path) -> list[Problem]:
        record, doc, problems = self._validate(path, schema.TrainingFile)
        if record is None or doc is None:
            return problems
        seen: dict[str, Location] = {}
        for i, hp in enumerate(record.common):
            entry = Entry(hp, doc, ("common", i))
            if hp.name in seen:
                problems.append(Problem(entry.where("name"), f"common[{i}].name", f"duplicate hyperparameter '{hp.name}' (first at {seen[hp.name]})"))
            seen[hp.name] = entry.where("name")
            self.common_training.append(entry)
        for f, fam in enumerate(record.families):
            if fam.family in self.family_training:
                problems.append(Problem(doc.location(("families", f, "family")), f"families[{f}].family", f"family '{fam.family}' is listed twice"))
                continue
            entries = []
            names: set[str] = set()
            for i, hp in enumerate(fam.hyperparameters):
                entry = Entry(hp, doc, ("families", f, "hyperparameters", i))
                if hp.name in names:
                    problems.append(Problem(entry.where("name"), f"families[{f}].hyperparameters[{i}].name", f"duplicate hyperparameter '{hp.name}'"))
                names.add(hp.name)
                entries.append(entry)
            self.family_training[fam.family] = entries
        return problems

    def _load_papers(self, path: Path) -> list[Problem]:
        record, doc, problems = self._validate(path, schema.PapersFile)
        if record is not None and doc is not None:
            for i, paper in enumerate(record.papers):
                entry = Entry(paper, doc, ("papers", i))
                if paper.key in self.papers:
                    self.duplicates.append(Problem(entry.where("key"), f"papers[{i}].key", f"duplicate paper key '{paper.key}' (first at {self.papers[paper.key].where('key')})"))
                else:
                    self.papers[paper.key] = entry
        return problems

    def _load_bib(self, path: Path) -> list[Problem]:
        entries, problems = parse_bibtex_file(path, self._shown(path))
        for key, entry in entries.items():
            if key in self.bibtex:
                problems.append(Problem(entry.location, key, f"duplicate BibTeX key (first at {self.bibtex[key].location})"))
            else:
                self.bibtex[key] = entry
        return problems

    def _load_single(self, path: Path) -> list[Problem]:
        folder = path.parent.name
        model, table = {
            "methods": (schema.Method, self.methods),
            "peft": (schema.PeftTechnique, self.peft),
            "models": (schema.ModelPreset, self.models),
            "datasets": (schema.DatasetPreset, self.datasets),
        }[folder]
        record, doc, problems = self._validate(path, model)
        if record is None or doc is None:
            return problems
        entry = Entry(record, doc, ())
        if record.id != path.stem:
            problems.append(Problem(entry.where("id"), "id", f"id '{record.id}' must match the file name '{path.name}'"))
        if record.id in table:
            self.duplicates.append(Problem(entry.where("id"), "id", f"duplicate id '{record.id}' (first at {table[record.id].where('id')})"))
        else:
            table[record.id] = entry
        return problems

    # ---------------------------------------------------------------------------------------------
    # Cross-references
    # ---------------------------------------------------------------------------------------------

    def _check_references(self) -> list[Problem]:
        problems: list[Problem] = list(self.duplicates)
        problems += self._check_categories()
        problems += self._check_papers()
        problems += self._check_methods()
        problems += self._check_presets()
        return problems

    def _unknown(self, kind: str, name: str, known: Iterable[str]) -> str:
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {kind} '{name}'{hint}"

    def _check_categories(self) -> list[Problem]:
        problems = []
        for cid, entry in self.categories.items():
            parent = entry.record.parent
            if parent is not None and parent not in self.categories:
                problems.append(Problem(entry.where("parent"), f"{format_loc(entry.loc)}.parent", self._unknown("category", parent, self.categories)))
        for cid, entry in self.categories.items():
            seen, node = {cid}, entry.record.parent
            while node is not None and node in self.categories:
                if node in seen:
                    problems.append(Problem(entry.where("parent"), f"{format_loc(entry.loc)}.parent", f"category cycle through '{cid}'"))
                    break
                seen.add(node)
                node = self.categories[node].record.parent
        return problems

    def _check_papers(self) -> list[Problem]:
        problems = []
        by_arxiv: dict[str, str] = {}
        by_title: dict[str, str] = {}
        for key, entry in self.papers.items():
            paper, field = entry.record, format_loc(entry.loc)
            for c, cat in enumerate(paper.categories):
                if cat not in self.categories:
                    problems.append(Problem(entry.where("categories", c), f"{field}.categories[{c}]", self._unknown("category", cat, self.categories)))
            if paper.arxiv:
                if paper.arxiv in by_arxiv:
                    problems.append(Problem(entry.where("arxiv"), f"{field}.arxiv", f"arXiv {paper.arxiv} is already catalogued as '{by_arxiv[paper.arxiv]}'"))
                by_arxiv.setdefault(paper.arxiv, key)
            title = normalise_title(paper.title)
            if title in by_title:
                problems.append(Problem(entry.where("title"), f"{field}.title", f"title already catalogued as '{by_title[title]}'"))
            by_title.setdefault(title, key)
            if key not in self.bibtex:
                problems.append(Problem(entry.where("key"), f"{field}.key", f"no BibTeX entry '{key}' in papers/*.bib"))
        for key, bib in self.bibtex.items():
            if key not in self.papers:
                problems.append(Problem(bib.location, key, "BibTeX entry has no paper record in papers/*.yaml"))
        return problems

    def _check_source(self, entry: Entry[Any], sub: PathKey) -> list[Problem]:
        hp = entry.record
        if hp.source.paper is not None and hp.source.paper not in self.papers:
            where = entry.loc + sub + ("source", "paper")
            return [Problem(entry.doc.location(where), format_loc(where), self._unknown("paper key", hp.source.paper, self.papers))]
        return []

    def _check_methods(self) -> list[Problem]:
        problems: list[Problem] = []
        for entries in [self.common_training, *self.family_training.values()]:
            for hp_entry in entries:
                problems += self._check_source(hp_entry, ())
        for mid, entry in self.methods.items():
            method = entry.record
            if method.category not in self.categories:
                problems.append(Problem(entry.where("category"), "category", self._unknown("category", method.category, self.categories)))
            for i, key in enumerate(method.papers):
                if key not in self.papers:
                    problems.append(Problem(entry.where("papers", i), f"papers[{i}]", self._unknown("paper key", key, self.papers)))
            for i, parent in enumerate(method.derived_from):
                if parent not in self.methods:
                    problems.append(Problem(entry.where("derived_from", i), f"derived_from[{i}]", self._unknown("method", parent, self.methods)))
            for i, hp in enumerate(method.hyperparameters):
                problems += self._check_source(Entry(hp, entry.doc, ("hyperparameters", i)), ())
            names = [hp.name for hp in method.hyperparameters]
            for i, name in enumerate(names):
                if name in names[:i]:
                    problems.append(Problem(entry.where("hyperparameters", i, "name"), f"hyperparameters[{i}].name", f"duplicate hyperparameter '{name}'"))
            inherited = {e.record.name: e.record for e in self.common_training}
            inherited.update({e.record.name: e.record for e in self.family_training.get(method.script.family, [])})
            for i, hp in enumerate(method.hyperparameters):
                base = inherited.get(hp.name)
                if base is not None and base.type != hp.type:
                    problems.append(Problem(entry.where("hyperparameters", i, "type"), f"hyperparameters[{i}].type", f"overrides training default '{hp.name}' of type {base.type} with type {hp.type}"))
            family_dir = self.templates / method.script.family
            if not (family_dir / "script.py.j2").is_file():
                problems.append(Problem(entry.where("script", "family"), "script.family", f"no template for family '{method.script.family}' (expected templates/{method.script.family}/script.py.j2)"))
            elif not (family_dir / "variants" / f"{method.script.variant}.py.j2").is_file():
                known = [p.name.removesuffix(".py.j2") for p in (family_dir / "variants").glob("*.py.j2")]
                problems.append(Problem(entry.where("script", "variant"), "script.variant", self._unknown(f"variant of family '{method.script.family}'", method.script.variant, known)))
            if method.script.family not in self.family_training:
                problems.append(Problem(entry.where("script", "family"), "script.family", f"training.yaml has no defaults for family '{method.script.family}'"))
            if method.data_format not in FAMILY_FORMATS[method.script.family]:
                problems.append(Problem(entry.where("data_format"), "data_format", f"family '{method.script.family}' trains on {sorted(FAMILY_FORMATS[method.script.family])}, not '{method.data_format}'"))
            if method.default_model not in self.models:
                problems.append(Problem(entry.where("default_model"), "default_model", self._unknown("model preset", method.default_model, self.models)))
            dataset = self.datasets.get(method.default_dataset)
            if dataset is None:
                problems.append(Problem(entry.where("default_dataset"), "default_dataset", self._unknown("dataset preset", method.default_dataset, self.datasets)))
            elif dataset.record.format not in FAMILY_FORMATS[method.script.family]:
                problems.append(Problem(entry.where("default_dataset"), "default_dataset", f"dataset '{dataset.record.id}' has format '{dataset.record.format}', which family '{method.script.family}' cannot train on"))
        problems += self._check_lineage()
        for pid, entry in self.peft.items():
            for i, key in enumerate(entry.record.papers):
                if key not in self.papers:
                    problems.append(Problem(entry.where("papers", i), f"papers[{i}]", self._unknown("paper key", key, self.papers)))
            for i, parent in enumerate(entry.record.derived_from):
                if parent not in self.peft:
                    problems.append(Problem(entry.where("derived_from", i), f"derived_from[{i}]", self._unknown("PEFT technique", parent, self.peft)))
            for i, hp in enumerate(entry.record.hyperparameters):
                problems += self._check_source(Entry(hp, entry.doc, ("hyperparameters", i)), ())
            if not (self.templates / "common" / "peft" / f"{pid}.py.j2").is_file():
                problems.append(Problem(entry.where("id"), "id", f"no template for PEFT technique '{pid}' (expected templates/common/peft/{pid}.py.j2)"))
        return problems

    def _check_lineage(self) -> list[Problem]:
        problems = []
        state: dict[str, int] = {}  # 0 = visiting, 1 = done

        def visit(mid: str, trail: list[str]) -> None:
            if state.get(mid) == 1:
                return
            if state.get(mid) == 0:
                cycle = trail[trail.index(mid) :] + [mid]
                entry = self.methods[mid]
                problems.append(Problem(entry.where("derived_from"), "derived_from", "lineage cycle: " + " -> ".join(cycle)))
                return
            state[mid] = 0
            for parent in self.methods[mid].record.derived_from:
                if parent in self.methods:
                    visit(parent, trail + [mid])
            state[mid] = 1

        for mid in sorted(self.methods):
            visit(mid, [])
        return problems

    def _check_presets(self) -> list[Problem]:
        problems = []
        for table in (self.models, self.datasets):
            for entry in table.values():
                for i, key in enumerate(entry.record.papers):
                    if key not in self.papers:
                        problems.append(Problem(entry.where("papers", i), f"papers[{i}]", self._unknown("paper key", key, self.papers)))
        return problems

    # ---------------------------------------------------------------------------------------------
    # Lookups used by the CLI and the compiler
    # ---------------------------------------------------------------------------------------------

    def method(self, name: str) -> schema.Method:
        return self._lookup("method", name, self.methods, {a.lower(): m for m, e in self.methods.items() for a in e.record.aliases}).record

    def model(self, name: str) -> schema.ModelPreset:
        return self._lookup("model preset", name, self.models, {}).record

    def dataset(self, name: str) -> schema.DatasetPreset:
        return self._lookup("dataset preset", name, self.datasets, {}).record

    def peft_technique(self, name: str) -> schema.PeftTechnique:
        return self._lookup("PEFT technique", name, self.peft, {}).record

    def _lookup(self, kind: str, name: str, table: dict[str, Entry[Any]], aliases: dict[str, str]) -> Entry[Any]:
        from .errors import CompileError

        if name in table:
            return table[name]
        if name.lower() in table:
            return table[name.lower()]
        if name.lower() in aliases:
            return table[aliases[name.lower()]]
        raise CompileError(self._unknown(kind, name, table) + f" (see `ptcompile list {kind.split()[0]}s`)")

    def training_defaults(self, family: str) -> list[schema.Hyperparameter]:
        merged = {e.record.name: e.record for e in self.common_training}
        merged.update({e.record.name: e.record for e in self.family_training.get(family, [])})
        return list(merged.values())

    def children(self, method_id: str) -> list[str]:
        return sorted(m for m, e in self.methods.items() if method_id in e.record.derived_from)


def normalise_title(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", title.lower()).strip()
