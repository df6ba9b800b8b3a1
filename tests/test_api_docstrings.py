"""The API reference matches the code: every public object ``docs/api.md`` renders (``:::`` entries, their public
members and methods; ``trak_core.__all__``; the backends' ``__all__``) documents, in its numpydoc ``Parameters``
section, exactly the parameters of its signature, and every default the docstring writes agrees with the
signature's.

An object whose docstring has no ``Parameters`` section (a one-line summary that names its parameters in prose) is
not held to the first rule. The backends are inspected without their frameworks (importing ``trak_torch``,
``trak_jax`` or ``trak_cupy`` imports none): nothing here imports torch, JAX or CuPy.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pathlib
import re
import subprocess
import sys
import types
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("trak_core", "trak_torch", "trak_jax", "trak_cupy")
FRAMEWORKS = ("torch", "jax", "cupy", "flax", "transformers")

# (object, parameter) pairs whose Parameters entry may differ from the signature, each with its reason. None now.
ALLOWED: dict[tuple[str, str], str] = {}

HEADER = re.compile(r"^([ \t]*)(Parameters|Other Parameters|Returns|Yields|Receives|Raises|Warns|Warnings|Attributes"
                    r"|Methods|See Also|Notes|References|Examples)\n\1-{3,}[ \t]*\n", re.M)
ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_]\w*(?:\s*,\s*\*{0,2}[A-Za-z_]\w*)*)\s*(?::\s*(.*))?$")
# "default X", "(default X)", "(default: X)", "Default: X", "defaults to X", "default=X" with X a Python literal
DEFAULT_AFTER = re.compile(r"\b(?:defaults? to\s+|default is\s+|default\s*[:=]\s*|default\s+)"
                           r"(``[^`]+``|`[^`]+`|[^\s,;)]+)", re.I)
# "``X`` (default)", "X (default, ...)": the value the default is
DEFAULT_BEFORE = re.compile(r"(``[^`]+``|[\w.+-]+)\s*\(default[,)]", re.I)
ROLES = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|ref|py:\w+):`")


@dataclasses.dataclass
class Documented:
    name: str  # as the API reference shows it: "trak_core.TRAK.score"
    obj: Any  # the function, or the class (its constructor)
    doc: str  # the docstring mkdocstrings renders (for a class, with its own __init__'s)


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise LookupError(dotted)


def _ours(obj: Any) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] in PACKAGES


def _own_doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__) if isinstance(getattr(obj, "__doc__", None), str) else ""


def _class_doc(cls: type) -> str:
    """The class docstring, with its own ``__init__``'s (``merge_init_into_class``)."""
    doc = _own_doc(cls)
    init = vars(cls).get("__init__")
    return doc + "\n\n" + _own_doc(init) if inspect.isfunction(init) and _own_doc(init) else doc


def _entries(package: str) -> list[str]:
    """Dotted names of ``package`` the API reference renders, and its (or trak_core's) ``__all__``."""
    text = (ROOT / "docs" / "api.md").read_text()
    names = [n for n in re.findall(r"^::: ([\w.]+)", text, re.M) if n.split(".")[0] == package]
    module = importlib.import_module(package)
    names += [f"{package}.{n}" for n in getattr(module, "__all__", ()) if not n.startswith("_")]
    return names


def collect(package: str) -> list[Documented]:
    """The public functions, classes and methods the API reference shows for ``package``."""
    found: dict[int, Documented] = {}

    def add(name: str, obj: Any, doc: str) -> None:
        found.setdefault(id(obj), Documented(name, obj, doc))

    def add_class(name: str, cls: type) -> None:
        add(name, cls, _class_doc(cls))
        for base in (c for c in cls.__mro__ if _ours(c)):  # inherited members too (TRAK renders them)
            for attribute, value in vars(base).items():
                if attribute.startswith("_"):
                    continue
                function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if inspect.isfunction(function):
                    add(f"{name}.{attribute}", function, _own_doc(function))

    def add_object(name: str, obj: Any) -> None:
        if isinstance(obj, types.ModuleType):
            add(name, obj, _own_doc(obj))  # its docstring is rendered too (it has no signature)
            members = getattr(obj, "__all__", None)
            if members is None:
                members = [n for n, v in vars(obj).items() if not n.startswith("_") and getattr(v, "__module__", None)
                           == obj.__name__]
            for member in members:
                value = getattr(obj, member)
                if (inspect.isclass(value) or inspect.isfunction(value)) and _ours(value):
                    add_object(f"{name}.{member}", value)
        elif inspect.isclass(obj):
            if _ours(obj):
                add_class(name, obj)
        elif inspect.isfunction(obj):
            add(name, obj, _own_doc(obj))

    for entry in _entries(package):
        add_object(entry, _resolve(entry))
    return list(found.values())


def parameter_entries(doc: str) -> list[tuple[str, str, str]]:
    """``(name, type, description)`` of each name in the ``Parameters`` (and ``Other Parameters``) sections;
    ``a, b : int`` gives two entries."""
    headers = list(HEADER.finditer(doc))
    entries: list[tuple[list[str], str, list[str]]] = []
    for i, header in enumerate(headers):
        if header.group(2) not in ("Parameters", "Other Parameters"):
            continue
        indent = header.group(1)
        body = doc[header.end():headers[i + 1].start() if i + 1 < len(headers) else len(doc)]
        current = None
        for line in body.splitlines():
            rest = line[len(indent):] if line.startswith(indent) else None
            if rest and not rest[0].isspace() and ENTRY.match(rest.strip()):
                match = ENTRY.match(rest.strip())
                current = ([n.strip() for n in match.group(1).split(",")], match.group(2) or "", [])
                entries.append(current)
            elif current is not None and line.strip():
                current[2].append(line.strip())
    return [(name, kind, " ".join(text)) for names, kind, text in entries for name in names]


def _signature(obj: Any) -> list[inspect.Parameter] | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # exception classes (no signature of their own)
        return None
    return [p for p in signature.parameters.values() if p.name not in ("self", "cls")]


def _literal(text: str) -> tuple[bool, Any]:
    text = text.strip().strip("`").rstrip(".:")
    try:
        return True, ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def _same(written: Any, default: Any) -> bool:
    if isinstance(written, bool) or isinstance(default, bool):
        return written is default
    return type(written) is type(default) and written == default or (
        isinstance(written, (int, float)) and isinstance(default, (int, float)) and written == default)


def parameter_mismatches(item: Documented) -> list[str]:
    parameters = _signature(item.obj)
    entries = parameter_entries(item.doc)
    if parameters is None or not entries:
        return []
    variadic = {p.name for p in parameters if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    in_signature = [p.name for p in parameters]
    documented = [name.lstrip("*") for name, _, _ in entries]
    problems = []
    stale = [n for n in documented if n not in in_signature and (item.name, n) not in ALLOWED]
    missing = [n for n in in_signature if n not in documented and n not in variadic and (item.name, n) not in ALLOWED]
    if stale:
        problems.append(f"{item.name}: documents {stale}, which the signature {in_signature} lacks")
    if missing:
        problems.append(f"{item.name}: does not document {missing} of the signature {in_signature}")
    repeated = sorted({n for n in documented if documented.count(n) > 1})
    if repeated:
        problems.append(f"{item.name}: documents {repeated} twice")
    order = [n for n in in_signature if n in documented]
    if not stale and not repeated and order != [n for n in documented if n in in_signature]:
        problems.append(f"{item.name}: documents its parameters in the order {documented}, the signature's is "
                        f"{in_signature}")
    return problems


def default_mismatches(item: Documented) -> list[str]:
    parameters = _signature(item.obj)
    if parameters is None:
        return []
    by_name = {p.name: p for p in parameters}
    problems = []
    for name, kind, text in parameter_entries(item.doc):
        parameter = by_name.get(name.lstrip("*"))
        if parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        required = parameter.default is inspect.Parameter.empty
        if required and re.search(r"\boptional\b", kind):
            problems.append(f"{item.name}({name}): typed 'optional' but the signature gives no default")
        written = [m.group(1) for m in DEFAULT_AFTER.finditer(kind + " " + text)]
        written += [m.group(1) for m in DEFAULT_BEFORE.finditer(text)]
        for value in written:
            readable, literal = _literal(value)
            if not readable:  # prose ("the next one", "all of them", "float32"): not checked
                continue
            if required:
                problems.append(f"{item.name}({name}): docstring says default {value}, the signature gives none")
            elif not _same(literal, parameter.default):
                problems.append(f"{item.name}({name}): docstring says default {value}, the signature's is "
                                f"{parameter.default!r}")
    return problems


def _collected(package: str) -> list[Documented]:
    if package != "trak_core":  # the backend packages import without their frameworks
        pytest.importorskip(package, reason=f"{package} (this repository's backends/) is not importable")
    return collect(package)


@pytest.mark.parametrize("package", PACKAGES)
def test_parameters_sections_name_the_signatures_parameters(package):
    items = _collected(package)
    problems = [p for item in items for p in parameter_mismatches(item)]
    assert not problems, "Parameters sections that do not match their signatures:\n" + "\n".join(problems)


@pytest.mark.parametrize("package", PACKAGES)
def test_documented_defaults_are_the_signatures(package):
    items = _collected(package)
    problems = [p for item in items for p in default_mismatches(item)]
    assert not problems, "defaults the docstrings write that the signatures do not have:\n" + "\n".join(problems)


@pytest.mark.parametrize("package", PACKAGES)
def test_docstrings_use_no_sphinx_roles(package):
    """mkdocstrings renders ``:func:`x``` as the literal text ":func:" before ``x``."""
    items = _collected(package)
    raw = [item.name for item in items if ROLES.search(item.doc)]
    assert not raw, f"docstrings with Sphinx roles (write ``name`` instead): {raw}"


def test_the_walk_covers_the_api_reference():
    """The checks are not vacuous: the walk finds the documented objects and parses their sections."""
    items = collect("trak_core")
    names = {item.name for item in items}
    assert {"trak_core.TRAK", "trak_core.TRAK.score", "trak_core.TRAK.open", "trak_core.project",
            "trak_core.RayExecutor", "trak_core.hashing.split64", "trak_core.Writer.finish"} <= names
    with_sections = [item for item in items if parameter_entries(item.doc)]
    assert len(items) >= 150 and len(with_sections) >= 60, (len(items), len(with_sections))
    trak = next(item for item in items if item.name == "trak_core.TRAK")
    assert [n for n, _, _ in parameter_entries(trak.doc)][:3] == ["model", "task", "proj_dim"]
    seed, checkpoint = parameter_entries(_own_doc(_resolve("trak_core.projection_matrix")))[2:4]
    assert (seed[0], checkpoint[0], seed[1]) == ("seed", "checkpoint", "int")


def test_the_parser_reads_defaults_and_stale_names():
    def f(a: int, b: int | None = None, *, c: str = "x") -> None:
        """Summary.

        Parameters
        ----------
        a, b : int, optional
            Default: 3.
        c : str
            ``"y"`` (default).
        d : int
            Gone.
        """

    item = Documented("f", f, _own_doc(f))
    assert parameter_mismatches(item) == ["f: documents ['d'], which the signature ['a', 'b', 'c'] lacks"]
    assert default_mismatches(item) == [
        "f(a): typed 'optional' but the signature gives no default",
        "f(a): docstring says default 3., the signature gives none",
        "f(b): docstring says default 3., the signature's is None",
        "f(c): docstring says default ``\"y\"``, the signature's is 'x'"]


def test_walking_the_api_imports_no_framework():
    code = ("import sys, importlib; sys.path[:0] = [sys.argv[1], sys.argv[2], sys.argv[1] + '/tests']; "
            "t = importlib.import_module('test_api_docstrings'); "
            "[t.collect(p) for p in t.PACKAGES]; "
            f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(ROOT / "backends")], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
