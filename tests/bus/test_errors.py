"""Every exception class the code base defines hangs under ``ShardplaneError`` (bus.errors), so
a service edge can tell "ours, with a message for a person" from a bug by one ``except``.

Read from the source, not by importing every module (that would load torch and OR-Tools for a
check about class bases): a class whose bases are only builtin exceptions starts a tree of its
own, and that is what this test refuses. A class under one of ours is under the root already."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bus", "agents", "projector", "planner", "api", "shardplane", "bench")
BUILTIN = {
    "BaseException",
    "Exception",
    "ValueError",
    "RuntimeError",
    "LookupError",
    "KeyError",
    "TypeError",
    "OSError",
    "ConnectionError",
    "TimeoutError",
}


def roots_in(source: str) -> list[str]:
    """The classes in ``source`` whose bases are all builtin exceptions."""
    out: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.bases:
            names = {b.id for b in node.bases if isinstance(b, ast.Name)}
            if len(names) == len(node.bases) and names <= BUILTIN:
                out.append(node.name)
    return out


def own_roots() -> set[str]:
    return {
        f"{path.relative_to(ROOT)}:{name}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in roots_in(path.read_text())
    }


def test_every_exception_is_under_shardplane_error() -> None:
    assert own_roots() == {"bus/errors.py:ShardplaneError"}


def test_the_scan_finds_a_root_of_its_own() -> None:
    """A new ``class X(ValueError)`` would be caught (the check is not vacuous); a class
    with one of ours among its bases is not a root."""
    source = "class Stray(ValueError):\n    pass\nclass Fine(Stray, KeyError):\n    pass\n"
    assert roots_in(source) == ["Stray"]
