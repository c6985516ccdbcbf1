"""MkDocs hooks for the generated reference site.

- on_config: the navigation comes from docs/_nav.json, which `ptcompile build` writes with the pages (the list of
  methods, models and categories is only known from the taxonomy).
- on_post_page: each method page holds a placeholder for its generated script; the compiler wrote the script's
  highlighted HTML to docs/scripts/<name>.html, and it is put in here, after the search index has been made.
  The scripts are the bulk of the site's HTML; keeping them out of Markdown and out of the search plugin's
  parser keeps the build fast as the catalogue grows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

_SCRIPT = re.compile(r'<div class="ptc-script" data-script="([A-Za-z0-9_.\-]+\.py)"></div>')


def on_config(config):
    nav_file = Path(config["docs_dir"]) / "_nav.json"
    if not nav_file.is_file():
        raise PluginError(f"{nav_file} is missing: run `ptcompile build` before `mkdocs build`")
    config["nav"] = json.loads(nav_file.read_text(encoding="utf-8"))
    return config


def on_post_page(output, page, config):
    def insert(match):
        fragment = Path(config["docs_dir"]) / "scripts" / f"{match.group(1)}.html"
        if not fragment.is_file():
            raise PluginError(f"{page.file.src_uri}: {fragment} is missing: run `ptcompile build`")
        return fragment.read_text(encoding="utf-8")

    return _SCRIPT.sub(insert, output)
