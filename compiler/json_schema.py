"""Export the taxonomy's JSON Schemas (draft-07) so editors validate contributors' YAML as they type.

pydantic emits JSON Schema 2020-12 with `$defs`; draft-07 tools (the YAML language server among them) expect
`definitions`. We ask pydantic for draft-07-style references and avoid 2020-12-only keywords (no tuples, so no
`prefixItems`); tests/test_json_schema.py validates every taxonomy file with a Draft7Validator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import schema

SCHEMAS: dict[str, type[schema.Strict]] = {
    "categories": schema.CategoriesFile,
    "training": schema.TrainingFile,
    "papers": schema.PapersFile,
    "method": schema.Method,
    "peft": schema.PeftTechnique,
    "model": schema.ModelPreset,
    "dataset": schema.DatasetPreset,
}


def json_schema(model: type[schema.Strict]) -> dict[str, Any]:
    document = model.model_json_schema(ref_template="#/definitions/{model}", mode="validation")
    if "$defs" in document:
        document["definitions"] = document.pop("$defs")
    text = json.dumps(document)
    for forbidden in ('"prefixItems"', '"$dynamicRef"', '"unevaluatedProperties"'):
        if forbidden in text:
            raise ValueError(f"{model.__name__}: schema uses {forbidden}, which draft-07 does not know")
    return {"$schema": "http://json-schema.org/draft-07/schema#", "$id": f"ptcompile/{model.__name__}", **document}


def render_schemas() -> dict[str, str]:
    return {f"{name}.schema.json": json.dumps(json_schema(model), indent=2, sort_keys=True) + "\n" for name, model in SCHEMAS.items()}


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
