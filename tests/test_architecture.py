"""The rules of the house in docs/architecture.md, checked on the source.

The layer table is parsed from the document itself, so the map and the code cannot
drift apart: a module that belongs to no row, or imports a unit its row does not allow,
fails here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import vdistream
import vdistream.errors

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vdistream"
DOC = ROOT / "docs" / "architecture.md"


def _layer_table() -> dict[str, set[str]]:
    text = DOC.read_text()
    table = text.split("<!-- layers:", 1)[1].split("<!-- /layers -->", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        rows[cells[0].strip("`")] = set(re.findall(r"`([\w]+)`", cells[2]))
    return rows


LAYERS = _layer_table()
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def _unit(module: str) -> str:
    """``vdistream.a.b`` -> ``a``; the package root is ``__init__``."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, lazy ones included, with its line."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            if target == "vdistream":  # `from vdistream import x`: x may be a unit
                found.extend((node.lineno, f"vdistream.{a.name}") for a in node.names)
    return found


def test_the_table_has_the_units_it_should() -> None:
    assert {"protocol", "vdi", "storage", "service", "cli", "__init__"} <= LAYERS.keys()
    for allowed in LAYERS.values():
        assert allowed <= LAYERS.keys(), allowed - LAYERS.keys()


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_import_follows_the_layer_table(path: Path) -> None:
    unit = _unit(_module_name(path))
    assert unit in LAYERS, f"{unit} has no row in docs/architecture.md's layer table"
    allowed = LAYERS[unit] | {unit}
    wrong = []
    for line, target in _imports(path):
        if target != "vdistream" and not target.startswith("vdistream."):
            continue
        other = _unit(target)
        if target == "vdistream":
            continue  # the names imported are checked one by one
        if other not in allowed and other in LAYERS:
            wrong.append(f"{path.name}:{line} imports {target} ({unit} may not import {other})")
        elif other not in LAYERS and f"vdistream.{other}" != target.rsplit(".", 1)[0]:
            wrong.append(f"{path.name}:{line} imports {target}, a unit with no row")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if _unit(_module_name(p)) == "protocol"],
    ids=lambda p: p.name,
)
def test_protocol_imports_only_the_standard_library(path: Path) -> None:
    for line, target in _imports(path):
        top = target.split(".")[0]
        assert top == "vdistream" or top in sys.stdlib_module_names, f"{path.name}:{line} {target}"


#: What structured concurrency rules out (architecture.md, "Rules of the house").
UNSTRUCTURED = re.compile(
    r"\bcreate_task\(|\bensure_future\(|\basyncio\.wait\(|\.__aenter__\(|\.__aexit__\(|"
    r"\bloop\.run_in_executor\(None"
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_task_outside_a_task_group(path: Path) -> None:
    hits = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        # An object that owns an exit stack hands its own __aexit__ on to the stack.
        if UNSTRUCTURED.search(code) and "``" not in code and "stack.__aexit__(" not in code:
            hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


CONFIGURES = re.compile(
    r"structlog\.configure\(|\.addHandler\(|logging\.basicConfig\(|dictConfig\(|"
    r"signal\.signal\(|add_signal_handler\(|open_signal_receiver\("
)
MAY_CONFIGURE = {"service/logconfig.py", "service/serve.py", "cli/framework.py"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_service_and_the_command_line_configure_logging_or_signals(
    path: Path,
) -> None:
    if str(path.relative_to(PACKAGE)) in MAY_CONFIGURE:
        return
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if CONFIGURES.search(line.split("#", 1)[0]) and "``" not in line
    ]
    assert not hits, "\n".join(hits)


def _drawn_tree() -> dict[str, str]:
    """``errors``' docstring tree as child -> drawn parent."""
    doc = vdistream.errors.__doc__ or ""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        match = re.match(r"^(\s*[│ ]*)(?:[├└]── )?([\w.]+)\b", line)
        if not match or not line.startswith("    ") or not line.strip():
            continue
        column = len(match.group(1))
        name = match.group(2).rsplit(".", 1)[-1]
        if "──" not in line and column != 4:
            continue
        while stack and stack[-1][0] >= column:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((column, name))
    return parents


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(vdistream.__path__, "vdistream."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == info.name
            ):
                found[name] = value
    return found


def test_every_exception_class_is_drawn_under_its_parent() -> None:
    drawn = _drawn_tree()
    wrong = []
    for name, cls in sorted(_exception_classes().items()):
        if name not in drawn:
            wrong.append(f"{cls.__module__}.{name} is not drawn")
        elif drawn[name] not in {base.__name__ for base in cls.__bases__}:
            wrong.append(f"{name} is drawn under {drawn[name]}, its bases are {cls.__bases__}")
    assert not wrong, "\n".join(wrong)
