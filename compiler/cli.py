"""The `ptcompile` command line.

    ptcompile METHOD --model PRESET [-o FILE] [--peft none|lora|qlora|dora|...] [--set name=value ...]
    ptcompile list methods|models|papers|datasets|peft|categories [--json]
    ptcompile show METHOD
    ptcompile diff METHOD_A METHOD_B [--model PRESET]
    ptcompile validate
    ptcompile build [--check]
    ptcompile tiny DIR [--shape PRESET]
    ptcompile schema [DIR]
    ptcompile paper add FILE.bib [--category ID] [--file STEM] [--dry-run]
    ptcompile estimate METHOD --model PRESET [--peft P] [--seq N] [--batch B] [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import CompileError, TaxonomyError

SUBCOMMANDS = ("list", "show", "diff", "validate", "build", "tiny", "schema", "paper", "estimate")


def _kb(args: argparse.Namespace):
    from .knowledge_base import KnowledgeBase

    root = Path(args.taxonomy) if getattr(args, "taxonomy", None) else None
    return KnowledgeBase.load(root)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--taxonomy", metavar="DIR", help="taxonomy directory (default: the one shipped with ptcompile)")


# ------------------------------------------------------------------------------------------------
# compile
# ------------------------------------------------------------------------------------------------


def compile_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptcompile",
        description="Compile a catalogued post-training method into a single-file training script.",
        epilog="Other commands: " + ", ".join(SUBCOMMANDS) + " (ptcompile COMMAND --help).",
    )
    parser.add_argument("method", help="method id or alias (ptcompile list methods)")
    parser.add_argument("--model", help="model preset (ptcompile list models); default: the method's default model")
    parser.add_argument("--dataset", help="dataset preset (ptcompile list datasets); default: the method's default dataset")
    parser.add_argument("--peft", default="none", help="none, or a PEFT technique: lora, qlora, dora, ... (ptcompile list peft)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE", help="override a hyperparameter default (type- and range-checked); repeatable")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the script here instead of stdout")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    parser.add_argument("--gpu", help="warn if the default batch and length will not fit this GPU (24GB, 40GB, 80GB, 141GB, h100, a100-40gb, rtx4090, ...)")
    parser.add_argument("--version", action="version", version=f"ptcompile {__version__}")
    _common(parser)
    return parser


def cmd_compile(argv: list[str]) -> int:
    from .recipe import resolve
    from .render import render_script

    args = compile_parser().parse_args(argv)
    kb = _kb(args)
    recipe = resolve(kb, args.method, args.model, args.peft, args.overrides, args.dataset)
    if args.gpu:
        from .estimate import fit_warning

        warning = fit_warning(kb, recipe, args.gpu)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if args.output:
        path = Path(args.output)
        source = render_script(recipe, script_name=path.name)
        if path.exists() and not args.force:
            raise CompileError(f"{path} exists; pass --force to overwrite it")
        if path.parent and not path.parent.exists():
            raise CompileError(f"directory {path.parent} does not exist")
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(source, encoding="utf-8")
        temporary.replace(path)
        print(f"wrote {path} ({len(source.splitlines())} lines): {recipe.command}", file=sys.stderr)
    else:
        sys.stdout.write(render_script(recipe))
    return 0


# ------------------------------------------------------------------------------------------------
# list / show / diff / validate
# ------------------------------------------------------------------------------------------------


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    widths = [min(w, 60) for w in widths]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    for row in rows:
        out.append(fmt.format(*(str(c) if len(str(c)) <= 60 else str(c)[:57] + "..." for c in row)))
    return "\n".join(out)


def cmd_list(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ptcompile list", description="List catalogue records.")
    parser.add_argument("kind", choices=["methods", "models", "papers", "datasets", "peft", "categories"])
    parser.add_argument("--json", action="store_true", help="machine-readable output (every field)")
    parser.add_argument("--category", help="papers/methods: only this category (and its sub-categories)")
    _common(parser)
    args = parser.parse_args(argv)
    kb = _kb(args)
    table = {"methods": kb.methods, "models": kb.models, "papers": kb.papers, "datasets": kb.datasets, "peft": kb.peft, "categories": kb.categories}[args.kind]
    records = [entry.record for entry in table.values()]
    if args.category:
        wanted = {args.category} | set(descendants(kb, args.category))
        if args.kind == "papers":
            records = [r for r in records if wanted & set(r.categories)]
        elif args.kind == "methods":
            records = [r for r in records if r.category in wanted]
    if args.json:
        print(json.dumps([r.model_dump(mode="json", exclude_none=True) for r in records], indent=2, ensure_ascii=False))
        return 0
    if args.kind == "methods":
        rows = [[m.id, m.name, m.category, m.script.family, m.data_format] for m in records]
        print(_table(rows, ["id", "name", "category", "family", "data"]))
    elif args.kind == "models":
        rows = [[m.id, m.hub_id or "(embedded)", f"{m.num_parameters / 1e9:.2f}B" if m.num_parameters > 1e8 else f"{m.num_parameters:,}", m.architecture.model_type, "gated" if m.gated else ""] for m in records]
        print(_table(rows, ["id", "hub id", "params", "type", ""]))
    elif args.kind == "papers":
        rows = [[p.key, p.date or "", p.arxiv or p.doi or p.url or "", p.title] for p in sorted(records, key=lambda p: (p.date or ""), reverse=True)]
        print(_table(rows, ["key", "date", "id", "title"]))
    elif args.kind == "datasets":
        rows = [[d.id, d.hub_id or f"(embedded) {d.embedded}", d.split, d.format] for d in records]
        print(_table(rows, ["id", "source", "split", "format"]))
    elif args.kind == "peft":
        rows = [[p.id, p.name, ", ".join(p.papers)] for p in records]
        print(_table(rows, ["id", "name", "papers"]))
    else:
        rows = [[c.id, c.parent or "", c.name] for c in records]
        print(_table(rows, ["id", "parent", "name"]))
    print(f"\n{len(records)} {args.kind}")
    return 0


def descendants(kb: Any, category: str) -> list[str]:
    found, frontier = [], [category]
    while frontier:
        current = frontier.pop()
        for cid, entry in kb.categories.items():
            if entry.record.parent == current:
                found.append(cid)
                frontier.append(cid)
    return found


def cmd_show(argv: list[str]) -> int:
    from .recipe import resolve

    parser = argparse.ArgumentParser(prog="ptcompile show", description="Show a method: objective, hyperparameters with sources, papers.")
    parser.add_argument("method")
    parser.add_argument("--model", help="resolve defaults for this model preset")
    parser.add_argument("--peft", default="none")
    _common(parser)
    args = parser.parse_args(argv)
    kb = _kb(args)
    method = kb.method(args.method)
    recipe = resolve(kb, method.id, args.model, args.peft)
    lines = [f"{method.name} ({method.id})", "=" * (len(method.name) + len(method.id) + 3), ""]
    if method.aliases:
        lines.append("Also known as: " + ", ".join(method.aliases))
    lines.append(f"Category: {method.category}    Family: {method.script.family}/{method.script.variant}    Data: {method.data_format}")
    needs = [name for name, flag in (("reference model", method.needs.reference_model), ("reward model", method.needs.reward_model), ("generation", method.needs.generation)) if flag]
    lines.append("Needs: " + (", ".join(needs) if needs else "nothing beyond the policy and the data"))
    if method.derived_from:
        lines.append("Derived from: " + ", ".join(method.derived_from))
    children = kb.children(method.id)
    if children:
        lines.append("Extended by: " + ", ".join(children))
    lines += ["", _wrap(method.summary), "", f"Objective ({method.objective.equation}):", "    " + method.objective.plain, "    LaTeX: " + method.objective.latex, ""]
    lines.append(f"Hyperparameters (for {recipe.model.id}{', ' + recipe.peft.id if recipe.peft else ''}):")
    for hp in recipe.hyperparameters + recipe.peft_hyperparameters:
        rng = f" in [{hp.range[0]}, {hp.range[1]}]" if hp.range else (f" one of {list(hp.choices)}" if hp.choices else "")
        lines.append(f"  {hp.name} = {hp.value!r}  ({hp.type}{rng}; from {hp.origin})")
        lines.append(_wrap(hp.description, indent=6))
        lines.append(_wrap("source: " + hp.source, indent=6))
    lines += ["", "Papers:"]
    for key in method.papers:
        paper = kb.papers[key].record
        lines.append(f"  [{key}] {paper.title} ({paper.date or 'n.d.'}, {paper.venue}) {paper.link}")
    if method.pitfalls:
        lines += ["", "Pitfalls:"] + [_wrap("- " + p, indent=2, hanging=4) for p in method.pitfalls]
    if method.frameworks:
        lines += ["", "In other frameworks:"] + [f"  {name}: {value}" for name, value in method.frameworks.items()]
    lines += ["", "Compile:", f"  {recipe.command} -o train_{method.id.replace('-', '_')}.py"]
    print("\n".join(lines))
    return 0


def _wrap(text: str, indent: int = 0, hanging: int | None = None) -> str:
    import textwrap

    return textwrap.fill(" ".join(text.split()), width=100, initial_indent=" " * indent, subsequent_indent=" " * (hanging if hanging is not None else indent))


def cmd_diff(argv: list[str]) -> int:
    from .recipe import resolve
    from .render import render_script, strip_docstring

    parser = argparse.ArgumentParser(prog="ptcompile diff", description="Unified diff of two methods' scripts (the code below the module docstring).")
    parser.add_argument("method_a")
    parser.add_argument("method_b")
    parser.add_argument("--model", help="model preset for both (default: METHOD_A's default model)")
    parser.add_argument("--peft", default="none")
    _common(parser)
    args = parser.parse_args(argv)
    kb = _kb(args)
    a, b = kb.method(args.method_a), kb.method(args.method_b)
    model = args.model or a.default_model
    # Same model and, where the formats agree, the same data: the diff then shows only the algorithm.
    dataset = a.default_dataset if a.data_format == b.data_format else None
    sources = []
    for method in (a, b):
        recipe = resolve(kb, method.id, model, args.peft, [], dataset if dataset and method is b else None)
        sources.append(strip_docstring(render_script(recipe, script_name="train.py")))
    diff = difflib.unified_diff(sources[0].splitlines(keepends=True), sources[1].splitlines(keepends=True), fromfile=f"{a.id}.py", tofile=f"{b.id}.py")
    sys.stdout.writelines(diff)
    return 0


def cmd_validate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ptcompile validate", description="Check every taxonomy file and cross-reference; list every problem.")
    _common(parser)
    args = parser.parse_args(argv)
    kb = _kb(args)
    print(
        f"ok: {len(kb.papers)} papers, {len(kb.methods)} methods, {len(kb.peft)} PEFT techniques, "
        f"{len(kb.models)} models, {len(kb.datasets)} datasets, {len(kb.categories)} categories ({len(kb.files)} files)"
    )
    return 0


# ------------------------------------------------------------------------------------------------
# build / tiny / schema / paper / estimate
# ------------------------------------------------------------------------------------------------


def cmd_build(argv: list[str]) -> int:
    from .build import build

    parser = argparse.ArgumentParser(prog="ptcompile build", description="Regenerate generated/ (one script per method), the JSON Schemas and the site's pages.")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if generated/ or the schemas are stale")
    parser.add_argument("--root", help="project checkout (default: the one ptcompile runs from)")
    _common(parser)
    args = parser.parse_args(argv)
    kb = _kb(args)
    return build(kb, Path(args.root) if args.root else None, check=args.check)


def cmd_tiny(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ptcompile tiny", description="Write the embedded tiny model (DIR/model) and the bundled tiny datasets (DIR/data).")
    parser.add_argument("directory", nargs="?", default="ptcompile-tiny")
    parser.add_argument("--shape", default="tiny", help="random-init a model of this preset's dimensions instead (with the tiny tokenizer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="write into DIR even if it exists")
    _common(parser)
    args = parser.parse_args(argv)
    from .tiny import materialise

    kb = _kb(args)
    preset = kb.model(args.shape)
    directory = Path(args.directory)
    if directory.exists() and any(directory.iterdir()) and not args.force:
        raise CompileError(f"{directory} exists and is not empty; pass --force to write into it")
    paths = materialise(preset, directory, seed=args.seed)
    for name, path in paths.items():
        print(f"{name:12s} {path}")
    return 0


def cmd_paper(argv: list[str]) -> int:
    from .paper_add import main as paper_main

    return paper_main(argv)


def cmd_estimate(argv: list[str]) -> int:
    from .estimate import main as estimate_main

    return estimate_main(argv)


def cmd_schema(argv: list[str]) -> int:
    from .json_schema import write_schemas

    parser = argparse.ArgumentParser(prog="ptcompile schema", description="Export the draft-07 JSON Schemas of the taxonomy files.")
    parser.add_argument("directory", nargs="?", help="default: taxonomy/_schema")
    _common(parser)
    args = parser.parse_args(argv)
    from .paths import taxonomy_dir

    target = Path(args.directory) if args.directory else taxonomy_dir() / "_schema"
    for path in write_schemas(target):
        print(path)
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "list": cmd_list,
    "show": cmd_show,
    "diff": cmd_diff,
    "validate": cmd_validate,
    "build": cmd_build,
    "tiny": cmd_tiny,
    "schema": cmd_schema,
    "paper": cmd_paper,
    "estimate": cmd_estimate,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if not argv or argv[0] in ("-h", "--help"):
            compile_parser().print_help()
            return 0
        return cmd_compile(argv)
    except TaxonomyError as exc:
        print(f"{len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''} in the taxonomy:", file=sys.stderr)
        print(str(exc), file=sys.stderr)
        if exc.stage == "files":
            print("(cross-references between files are checked once these are fixed)", file=sys.stderr)
        return 1
    except CompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ptcompile dpo | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
