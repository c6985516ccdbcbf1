"""Extract named top-level functions (and classes) from an emitted script so tests can call the exact code users run."""

from __future__ import annotations

import ast

import torch
import torch.nn.functional as F


def load_functions(source: str, names: list[str]) -> dict:
    tree = ast.parse(source)
    wanted = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names]
    missing = set(names) - {node.name for node in wanted}
    assert not missing, f"the script defines no {sorted(missing)}"
    module = ast.Module(body=wanted, type_ignores=[])
    namespace = {"torch": torch, "F": F, "math": __import__("math"), "Args": object}
    exec(compile(module, "<emitted script>", "exec"), namespace)
    return {name: namespace[name] for name in names}
