"""The exported JSON Schemas are draft-07, fresh, and accept every shipped taxonomy file."""

from __future__ import annotations

import json

import jsonschema
import pytest

from ptcompile.json_schema import SCHEMAS, render_schemas
from ptcompile.paths import taxonomy_dir
from ptcompile.yaml_source import load_yaml

KIND_BY_FOLDER = {"papers": "papers", "methods": "method", "peft": "peft", "models": "model", "datasets": "dataset"}


def schema_for(path):
    rel = path.relative_to(taxonomy_dir())
    if len(rel.parts) == 1:
        return {"categories.yaml": "categories", "training.yaml": "training"}[rel.name]
    return KIND_BY_FOLDER[rel.parts[0]]


def test_schemas_on_disk_are_fresh():
    for name, text in render_schemas().items():
        assert (taxonomy_dir() / "_schema" / name).read_text() == text, f"{name} is stale: run `ptcompile build`"


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_schemas_are_valid_draft_07(kind):
    document = json.loads(render_schemas()[f"{kind}.schema.json"])
    jsonschema.Draft7Validator.check_schema(document)
    assert "$defs" not in json.dumps(document)


def test_every_taxonomy_file_validates_against_its_schema():
    validators = {kind: jsonschema.Draft7Validator(json.loads(text)) for kind, text in ((n.split(".")[0], t) for n, t in render_schemas().items())}
    files = [p for p in taxonomy_dir().rglob("*.yaml") if "_schema" not in p.parts]
    assert len(files) > 20
    for path in files:
        doc, problems = load_yaml(path, str(path))
        assert not problems
        errors = list(validators[schema_for(path)].iter_errors(doc.data))
        assert not errors, f"{path}: {errors[0].message}"


def test_schema_rejects_what_the_loader_rejects():
    validator = jsonschema.Draft7Validator(json.loads(render_schemas()["papers.schema.json"]))
    bad = {"papers": [{"key": "x2023y", "title": "T", "venue": "arXiv", "date": "2023-05", "arxiv": 2305.18290, "categories": ["surveys"]}]}
    assert list(validator.iter_errors(bad)), "an unquoted (float) arXiv id must be rejected"
    bad["papers"][0]["arxiv"] = "2305.18290"
    bad["papers"][0]["summry"] = "typo"
    assert list(validator.iter_errors(bad)), "unknown fields must be rejected"
