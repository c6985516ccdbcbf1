"""Where the taxonomy, templates and bundled assets live, installed or in a checkout.

In a wheel, taxonomy/ and templates/ are installed inside the package (ptcompile/taxonomy, ptcompile/templates);
in a source checkout they sit beside compiler/. Contributors can point at another tree with --taxonomy or the
PTCOMPILE_TAXONOMY / PTCOMPILE_TEMPLATES environment variables.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _find(name: str, env: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env]).resolve()
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the {name}/ directory next to {PACKAGE_DIR}; set {env}")


def taxonomy_dir() -> Path:
    return _find("taxonomy", "PTCOMPILE_TAXONOMY")


def templates_dir() -> Path:
    return _find("templates", "PTCOMPILE_TEMPLATES")


def assets_dir() -> Path:
    return PACKAGE_DIR / "assets"


def project_root() -> Path | None:
    """The source checkout (where generated/ and site/ live), or None for an installed wheel."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "generated").is_dir() else None
