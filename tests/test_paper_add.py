"""`ptcompile paper add`: canonical records from BibTeX, duplicates refused, nothing existing rewritten."""

from __future__ import annotations

import shutil

import pytest

from ptcompile.cli import main
from ptcompile.knowledge_base import KnowledgeBase
from ptcompile.paths import taxonomy_dir

NEW = """@article{anything,
  title={{Group Robust Preference Optimization in Reward-free RLHF}},
  author={Ramesh, Shyam Sundhar and Hu, Yifan and Chaimalas, Iason and Bogunovic, Ilija},
  journal={arXiv preprint arXiv:2405.20304},
  year={2024}
}
"""


@pytest.fixture
def taxonomy(tmp_path):
    target = tmp_path / "taxonomy"
    shutil.copytree(taxonomy_dir(), target)
    return target


def test_adds_a_canonical_record_and_appends_only(taxonomy, tmp_path, capsys):
    bib = tmp_path / "new.bib"
    bib.write_text(NEW)
    target = taxonomy / "papers" / "surveys.yaml"
    before_yaml, before_bib = target.read_text(), (taxonomy / "papers" / "surveys.bib").read_text()
    assert main(["paper", "add", str(bib), "--category", "preference-optimization", "--file", "surveys", "--taxonomy", str(taxonomy)]) == 0
    assert target.read_text().startswith(before_yaml.rstrip("\n"))
    assert (taxonomy / "papers" / "surveys.bib").read_text().startswith(before_bib.rstrip())
    kb = KnowledgeBase.load(taxonomy)
    paper = kb.papers["ramesh2024group"].record
    assert paper.arxiv == "2405.20304" and paper.date == "2024-05" and paper.authors[0] == "Shyam Sundhar Ramesh"
    assert paper.categories == ["preference-optimization"]


@pytest.mark.parametrize(
    "bibtex, reason",
    [
        ("@article{x, title={Direct Preference Optimization: Your Language Model is Secretly a Reward Model}, author={Someone, A}, year={2023}}", "title is already catalogued"),
        ("@article{x, title={Another title}, author={Doe, J}, journal={arXiv preprint arXiv:2305.18290}, year={2023}}", "arXiv 2305.18290 is already catalogued"),
        ("@article{x, title={Direct things}, author={Rafailov, R}, year={2023}, eprint={2399.00001}}", "key 'rafailov2023direct' is taken"),
    ],
)
def test_refuses_duplicates(taxonomy, tmp_path, capsys, bibtex, reason):
    bib = tmp_path / "dup.bib"
    bib.write_text(bibtex)
    assert main(["paper", "add", str(bib), "--taxonomy", str(taxonomy)]) == 2
    assert reason in capsys.readouterr().err


def test_broken_bibtex_is_a_located_error(taxonomy, tmp_path, capsys):
    bib = tmp_path / "broken.bib"
    bib.write_text("@article{a,\n  title = {ok},\n  year = {2024},\n}\n\n@article{b,\n  title = {never closed\n")
    assert main(["paper", "add", str(bib), "--taxonomy", str(taxonomy)]) == 1
    assert f"{bib}:6:1: -: BibTeX block could not be parsed" in capsys.readouterr().err


def test_proposes_a_fitting_category(taxonomy, tmp_path, capsys):
    bib = tmp_path / "prm.bib"
    bib.write_text("@article{p, title={Process Reward Models for Step-by-Step Math Verification}, author={Doe, Jane}, journal={arXiv preprint arXiv:2601.00001}, year={2026}}")
    assert main(["paper", "add", str(bib), "--dry-run", "--taxonomy", str(taxonomy)]) == 0
    err = capsys.readouterr().err
    assert "category process-reward-models (proposed" in err
