"""A wheel carries the taxonomy and templates: installed (not editable), ptcompile works from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_contains_data_and_works_from_anywhere(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("ptcompile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ptcompile/taxonomy/methods/dpo.yaml" in names
    assert "ptcompile/templates/preference/script.py.j2" in names
    assert "ptcompile/assets/tiny/tokenizer.json" in names
    assert any(n.startswith("ptcompile/taxonomy/papers/") and n.endswith(".bib") for n in names)
    target = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    env.pop("PTCOMPILE_TAXONOMY", None)
    probe = subprocess.run([sys.executable, "-c", "import ptcompile; print(ptcompile.__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(target)), probe.stdout
    result = subprocess.run([sys.executable, "-m", "ptcompile.cli", "dpo", "--model", "llama3-8b"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "meta-llama/Meta-Llama-3-8B" in result.stdout and "2305.18290" in result.stdout
