"""A broken taxonomy yields one located error per problem, all in one run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ptcompile.errors import TaxonomyError
from ptcompile.knowledge_base import KnowledgeBase
from ptcompile.paths import taxonomy_dir, templates_dir


@pytest.fixture
def taxonomy(tmp_path) -> Path:
    target = tmp_path / "taxonomy"
    shutil.copytree(taxonomy_dir(), target, ignore=shutil.ignore_patterns("_schema"))
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(needle)


def load_problems(taxonomy: Path, templates: Path | None = None) -> list[str]:
    with pytest.raises(TaxonomyError) as info:
        KnowledgeBase.load(taxonomy, templates or templates_dir())
    return [str(p) for p in info.value.problems]


def test_file_level_problems_are_each_reported_with_file_line_column_and_field(taxonomy):
    dpo, sft = taxonomy / "methods/dpo.yaml", taxonomy / "methods/sft.yaml"
    papers = taxonomy / "papers/methods-offline.yaml"
    edit(dpo, "    default: 0.1\n", '    default: "0.1"\n')  # a string where a float belongs
    edit(dpo, "data_format: preference", "data_format: preference\nsummry: oops")  # unknown field
    edit(sft, "hyperparameters: []", "hyperparameters:\n  - name: warmup_ratio\n    type: float\n    default: 0.9\n    range: [0.0, 0.5]\n    description: too high\n    source: {common_practice: test}")
    edit(papers, '    arxiv: "2305.18290"', "    arxiv: 2305.18290")  # unquoted: YAML reads a float
    tiny = taxonomy / "models/tiny.yaml"
    edit(tiny, "gated: false", "gated: false\ngated: true")  # duplicate key
    (taxonomy / "papers/methods-offline.bib").write_text((taxonomy / "papers/methods-offline.bib").read_text() + "\n@article{rafailov2023direct,\n  title = {again},\n  year = {2023},\n}\n\n@article{broken,\n  title = {no end\n")

    problems = load_problems(taxonomy)
    text = "\n".join(problems)
    quoted_default = line_of(dpo, 'default: "0.1"')
    expected = [
        rf"methods/dpo\.yaml:{quoted_default}:\d+: hyperparameters\[0\]\.default: ",
        rf"methods/dpo\.yaml:{line_of(dpo, 'summry')}:1: summry: unknown field",
        rf"methods/sft\.yaml:{line_of(sft, 'default: 0.9')}:\d+: hyperparameters\[0\]\.default: 0\.9 is outside the range \[0\.0, 0\.5\]",
        rf"papers/methods-offline\.yaml:{line_of(papers, 'arxiv: 2305.18290')}:\d+: papers\[0\]\.arxiv: Input should be a valid string",
        rf"models/tiny\.yaml:{line_of(tiny, 'gated: true')}:\d+: -: YAML error: duplicate key",
        r"papers/methods-offline\.bib:\d+:1: rafailov2023direct: duplicate BibTeX key",
        r"papers/methods-offline\.bib:\d+:1: -: BibTeX block could not be parsed",
    ]
    for pattern in expected:
        matches = [p for p in problems if re.search(pattern, p)]
        assert len(matches) == 1, f"expected exactly one problem matching {pattern!r}; got:\n{text}"
    assert len(problems) == len(expected), text


def test_cross_reference_problems_are_all_reported_in_one_run(taxonomy):
    dpo, sft = taxonomy / "methods/dpo.yaml", taxonomy / "methods/sft.yaml"
    edit(dpo, "papers: [rafailov2023direct]", "papers: [rafailov2023directt]")
    edit(dpo, "derived_from: []", "derived_from: [sft]")
    edit(sft, "derived_from: []", "derived_from: [dpo, nosuchmethod]")  # a cycle and an unknown parent
    edit(sft, "script: {family: sft, variant: sft}", "script: {family: ppo, variant: sft}")  # no template (removed below)
    edit(dpo, "category: preference-optimization", "category: preference-optimisation")
    categories = taxonomy / "categories.yaml"
    edit(categories, "  - id: peft\n", "  - id: distillation\n")  # duplicate id
    templates = taxonomy.parent / "templates"
    shutil.copytree(templates_dir(), templates)
    shutil.rmtree(templates / "ppo")  # every family has a template now; take one away

    problems = load_problems(taxonomy, templates)
    text = "\n".join(problems)
    expected = [
        rf"methods/dpo\.yaml:{line_of(dpo, 'papers: [')}:\d+: papers\[0\]: unknown paper key 'rafailov2023directt'; did you mean 'rafailov2023direct'",
        rf"methods/sft\.yaml:{line_of(sft, 'derived_from')}:\d+: derived_from\[1\]: unknown method 'nosuchmethod'",
        r"methods/(dpo|sft)\.yaml:\d+:\d+: derived_from: lineage cycle: (dpo -> sft -> dpo|sft -> dpo -> sft)",
        rf"methods/sft\.yaml:{line_of(sft, 'script:')}:\d+: script\.family: no template for family 'ppo'",
        rf"methods/dpo\.yaml:{line_of(dpo, 'category:')}:\d+: category: unknown category 'preference-optimisation'; did you mean 'preference-optimization'",
        rf"categories\.yaml:\d+:\d+: categories\[\d+\]\.id: duplicate category id 'distillation'",
    ]
    for pattern in expected:
        matches = [p for p in problems if re.search(pattern, p)]
        assert len(matches) == 1, f"expected exactly one problem matching {pattern!r}; got:\n{text}"


def test_the_shipped_taxonomy_is_valid(kb):
    assert kb.methods and kb.models and kb.papers and kb.datasets
