"""Contributor strings never become code.

Hostile strings (quotes, triple quotes, newlines, backslashes, Jinja syntax, </script>, U+2028, bidi and NUL
characters) are pushed through every free-text field of a paper, a method (and its hyperparameters), a model
and a dataset. The emitted script must still parse and must contain exactly the statements the template put
there: its AST, with every string constant blanked, equals the AST of the script compiled from clean data.
"""

from __future__ import annotations

import ast
import copy
import itertools

import pytest

from ptcompile.knowledge_base import Entry
from ptcompile.recipe import resolve
from ptcompile.render import comment, doc, lit, render_script

HOSTILE = [
    '"""; import os; os.system("id") #',
    "'''\nimport os\n'''",
    "trailing backslash \\",
    "\\N{BULLET} \\x00 \\u2028",
    "{{ recipe.method }} {% if true %}x{% endif %} {# c #}",
    "</script><script>alert(1)</script>",
    "line one\u2028import os\u2029import sys",
    "carriage\r\nimport os\rimport sys\x0bimport re\x0cimport io\x85import ab",
    "nul\x00byte and bidi \u202eevil\u202c",
    '"',
    "'",
    "\\",
    "# -*- coding: latin-1 -*-",
    "f'{__import__(\"os\").system(\"id\")}'",
]


COMBINED = " ".join(HOSTILE)
"""Every hostile string at once: whichever field a template forgets to filter, this text breaks the code."""


def hostile_cycle():
    return itertools.cycle(HOSTILE)


def hostile_combined():
    return itertools.repeat(COMBINED)


def _text_update(record, fields, strings):
    update = {}
    for name in fields:
        value = getattr(record, name)
        if isinstance(value, str):
            update[name] = next(strings)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            update[name] = [next(strings) for _ in value]
        elif isinstance(value, dict):
            update[name] = {k: next(strings) for k in value}
    return record.model_copy(update=update)


def _poison_hp(hp, strings):
    source = hp.source.model_copy(update={"where": next(strings)} if hp.source.where else {"common_practice": next(strings)})
    update = {"description": next(strings), "source": source}
    # Free-text values reach code too (through |lit): poison them, bypassing validation. A value with `choices`
    # is a compile-time switch that schema.check_value holds to its list (for the YAML default and --set): it
    # stays valid here, or the template could not pick its code at all.
    if hp.type == "str" and not hp.choices:
        update["default"] = next(strings)
    return hp.model_copy(update=update)


def poison(kb, method_id: str, model_id: str, strings, peft_id: str | None = None) -> object:
    """A copy of the knowledge base whose method, its papers, the model, the dataset, the family's and the
    common training defaults, the category and (when given) the PEFT technique carry hostile text."""
    bad = copy.copy(kb)
    bad.methods, bad.papers, bad.models, bad.datasets = dict(kb.methods), dict(kb.papers), dict(kb.models), dict(kb.datasets)
    bad.peft, bad.categories = dict(kb.peft), dict(kb.categories)
    method = kb.methods[method_id].record
    hyperparameters = [_poison_hp(hp, strings) for hp in method.hyperparameters]
    bad.common_training = [Entry(_poison_hp(e.record, strings), e.doc, e.loc) for e in kb.common_training]
    bad.family_training = dict(kb.family_training)
    family = method.script.family
    bad.family_training[family] = [Entry(_poison_hp(e.record, strings), e.doc, e.loc) for e in kb.family_training.get(family, [])]
    category = _text_update(kb.categories[method.category].record, ["name", "description", "survey_section"], strings)
    bad.categories[method.category] = Entry(category, kb.categories[method.category].doc, ())
    if peft_id is not None:
        technique = kb.peft[peft_id].record
        technique = _text_update(technique, ["name", "summary", "pitfalls"], strings)
        technique = technique.model_copy(update={"hyperparameters": [_poison_hp(hp, strings) for hp in technique.hyperparameters]})
        bad.peft[peft_id] = Entry(technique, kb.peft[peft_id].doc, ())
    objective = _text_update(method.objective, ["latex", "plain", "equation"], strings)
    method = _text_update(method, ["name", "aliases", "summary", "pitfalls", "frameworks"], strings)
    method = method.model_copy(update={"objective": objective, "hyperparameters": hyperparameters})
    bad.methods[method_id] = Entry(method, kb.methods[method_id].doc, ())
    for key in method.papers:
        paper = _text_update(kb.papers[key].record, ["title", "authors", "venue", "summary"], strings)
        bad.papers[key] = Entry(paper, kb.papers[key].doc, ())
    model = _text_update(kb.models[model_id].record, ["name", "license", "config_source", "hub_id"], strings)
    bad.models[model_id] = Entry(model, kb.models[model_id].doc, ())
    dataset_id = resolve(kb, method_id, model_id).dataset.id
    dataset = _text_update(kb.datasets[dataset_id].record, ["name", "license", "description", "hub_id", "config", "split", "embedded", "columns"], strings)
    bad.datasets[dataset_id] = Entry(dataset, kb.datasets[dataset_id].doc, ())
    return bad


class _BlankStrings(ast.NodeTransformer):
    def visit_Constant(self, node):
        if isinstance(node.value, str):
            return ast.copy_location(ast.Constant(value=""), node)
        return node


def shape(source: str) -> str:
    return ast.dump(_BlankStrings().visit(ast.parse(source)))


def cases(kb):
    return [(m, kb.methods[m].record.default_model) for m in sorted(kb.methods)] + [("dpo", "tiny"), ("dpo", "llama3-8b")]


def assert_immune(kb, method_id: str, model_id: str, peft: str | None) -> None:
    clean = render_script(resolve(kb, method_id, model_id, peft))
    for strings in (hostile_cycle(), hostile_combined()):
        bad_kb = poison(kb, method_id, model_id, strings, peft)
        hostile = render_script(resolve(bad_kb, method_id, model_id, peft))
        assert hostile != clean, "the hostile strings did not reach the script"
        assert shape(hostile) == shape(clean), f"{method_id} x {model_id} ({peft}): hostile text changed the code"
        for line in hostile.splitlines():
            assert "\u2028" not in line and "\u2029" not in line and "\x00" not in line and "\u202e" not in line


def test_every_method_script_is_immune_to_hostile_text(kb):
    """Every family's template (each method's script), in full fine-tuning and with LoRA."""
    for method_id, model_id in cases(kb):
        for peft in (None, "lora"):
            if peft and peft not in kb.peft:
                continue
            assert_immune(kb, method_id, model_id, peft)


def test_every_peft_template_is_immune_to_hostile_text(kb):
    """Every PEFT technique's template, with its own text and hyperparameters poisoned as well."""
    for peft in sorted(kb.peft):
        assert_immune(kb, "dpo", "tiny", peft)


@pytest.mark.parametrize("text", HOSTILE)
def test_filters(text):
    assert ast.literal_eval(lit(text)) == text
    # inside a docstring the text reads back as itself, collapsed to one line
    assert ast.literal_eval('"""' + doc(text) + '"""') == " ".join(text.split())
    body = f"x = 1  # {comment(text)}\n"
    assert ast.dump(ast.parse(body)) == ast.dump(ast.parse("x = 1\n"))
    docstring = f'def f():\n    """{doc(text)}"""\n    return 1\n'
    tree = ast.parse(docstring)
    assert len(tree.body) == 1 and len(tree.body[0].body) == 2


def test_non_finite_floats_are_refused():
    from ptcompile.errors import CompileError

    for value in (float("nan"), float("inf")):
        with pytest.raises(CompileError):
            lit(value)


def test_every_compiled_script_is_free_of_unused_and_undefined_names(kb):
    """pyflakes over every method x PEFT technique that compiles (414 scripts): an import a script never uses,
    a variable computed and dropped, or a name used but never defined fails here, before a reader or a user's
    run meets it."""
    import io

    from pyflakes.api import check
    from pyflakes.reporter import Reporter

    from ptcompile.errors import CompileError

    warnings, scripts = io.StringIO(), 0
    for method in kb.methods:
        for peft in [None, "lora", "qlora", "dora", "rslora", "adalora", "prefix-tuning", "p-tuning-v2", "prompt-tuning", "ia3"]:
            try:
                source = render_script(resolve(kb, method, "tiny", peft))
            except CompileError:
                continue  # a combination the compiler refuses, with its own message (tests/test_cli.py)
            scripts += 1
            check(source, f"{method} x {peft or 'full'}", Reporter(warnings, warnings))
    assert scripts > 300
    assert warnings.getvalue() == "", warnings.getvalue()[:3000]
