"""generated/ is fresh, and `ptcompile build --check` notices when it is not."""

from __future__ import annotations

import shutil

from ptcompile.build import build, generated_files
from conftest import ROOT


def test_generated_scripts_are_fresh(kb):
    assert build(kb, ROOT, check=True) == 0, "generated/ or taxonomy/_schema is stale: run `ptcompile build`"


def test_check_fails_on_a_stale_or_stray_file(kb, tmp_path):
    root = tmp_path / "checkout"
    (root / "generated").mkdir(parents=True)
    for name, text in generated_files(kb).items():
        (root / "generated" / name).write_text(text)
    taxonomy = tmp_path / "taxonomy"
    shutil.copytree(kb.root, taxonomy)
    kb.root, original = taxonomy, kb.root
    try:
        assert build(kb, root, check=True) == 0
        script = root / "generated" / "train_dpo.py"
        script.write_text(script.read_text().replace("beta: float = 0.1", "beta: float = 0.2"))
        assert build(kb, root, check=True) == 1
        script.write_text(generated_files(kb)["train_dpo.py"])
        (root / "generated" / "train_mine.py").write_text("# hand-written\n")
        assert build(kb, root, check=True) == 1
    finally:
        kb.root = original


def test_every_method_has_a_generated_script(kb):
    for method_id in kb.methods:
        assert (ROOT / "generated" / f"train_{method_id.replace('-', '_')}.py").is_file()
