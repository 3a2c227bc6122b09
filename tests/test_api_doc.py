"""docs/api.md is the contract users build against: every signature in its headings is
the code's (names, order, positional or keyword-only, defaults), and every public name of
the package is on the page. A signature changed in code and not on the page, or the
reverse, fails here."""

from __future__ import annotations

import ast
import inspect
import pathlib
import re

import pytest

import moe_kernels

API = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api.md"
TEXT = API.read_text()
# "### `name(params) -> result`": a function, a class (its constructor) or Class.method
HEADINGS = re.findall(r"^###+ `([\w.]+)\((.*?)\)(?:\s*->[^`]*)?`\s*$", TEXT, re.M)
KINDS = {inspect.Parameter.POSITIONAL_ONLY: "positional", inspect.Parameter.POSITIONAL_OR_KEYWORD:
         "positional", inspect.Parameter.KEYWORD_ONLY: "keyword", inspect.Parameter.VAR_POSITIONAL:
         "*args", inspect.Parameter.VAR_KEYWORD: "**kwargs"}


def _documented(params: str) -> list[tuple[str, str, str | None]]:
    """(name, kind, default as written or None) of a heading's parameter list."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    out = [(a.arg, "positional", d) for a, d in zip(positional, defaults)]
    out += [(args.vararg.arg, "*args", None)] if args.vararg else []
    out += [(a.arg, "keyword", d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    out += [(args.kwarg.arg, "**kwargs", None)] if args.kwarg else []
    return [(n, k, None if d is None else ast.unparse(d)) for n, k, d in out]


def _in_code(name: str) -> list[tuple[str, str, str | None]]:
    obj = moe_kernels
    for part in name.split("."):
        obj = getattr(obj, part)
    # a default as source text: repr gives literals and "torch.bfloat16" alike
    return [(p.name, KINDS[p.kind], None if p.default is inspect.Parameter.empty
             else repr(p.default))
            for p in inspect.signature(obj).parameters.values() if p.name != "self"]


def _normalised(params):
    """Defaults compared as values where they are literals ('a' and "a" alike)."""
    def value(d):
        try:
            return repr(ast.literal_eval(d))
        except (ValueError, SyntaxError):
            return d
    return [(n, k, None if d is None else value(d)) for n, k, d in params]


def test_the_page_has_signature_headings():
    assert len(HEADINGS) >= 20, f"{len(HEADINGS)} signature headings in {API}"


@pytest.mark.parametrize("name,params", HEADINGS, ids=[h[0] for h in HEADINGS])
def test_heading_signature_is_the_codes(name, params):
    assert _normalised(_documented(params)) == _normalised(_in_code(name)), \
        f"docs/api.md's `{name}(...)` and the code's signature differ"


@pytest.mark.parametrize("name", moe_kernels.__all__)
def test_every_public_name_is_on_the_page(name):
    assert re.search(rf"`(moe_kernels\.)?{re.escape(name)}\b", TEXT), \
        f"moe_kernels.{name} is public (__all__) but docs/api.md does not name it"
