"""What a custom task computes, as a digest for a store's fingerprint.

One job: tell two custom tasks apart when they would give other numbers, and not when they would not. A
function is identified by its source (its bytecode where Python keeps no source), the constants and names of its
code, its defaults, the values its closure captured and the values of the globals it reads, recursively through the
functions it calls; trak-core's own functions and classes (a subclass of a built-in task inherits its methods) by
their qualified names, as the built-in tasks are identified by name, so that editing trak-core refuses no store;
``functools.partial`` objects by their function and arguments, callable objects by their class's ``__call__``
and their attributes. Module names and source text are not part of it: the same function imported from the
script that wrote a store, or defined where Python keeps no source, has the same identity.
"""
from __future__ import annotations

import functools
import hashlib
import types
from typing import Any

__all__ = ["callable_digest", "task_functions", "task_identity", "task_identity_before_classes"]

_DEPTH = 6  # how deep functions calling functions, and objects holding objects, are followed
_OWN_PACKAGES = ("trak_core", "trak_torch", "trak_jax", "trak_cupy")


def _own_name(value: Any) -> str | None:
    """``value``'s qualified name if one of trak-core's packages defines it (a function or a class), else ``None``."""
    module = getattr(value, "__module__", None)
    if isinstance(module, str) and module.split(".")[0] in _OWN_PACKAGES:
        return getattr(value, "__qualname__", None)
    return None


def callable_digest(function: Any, *, by_name: bool = True) -> str:
    """A 16-hex digest of what ``function`` computes (``"-"`` for ``None``)."""
    if function is None:
        return "-"
    hasher = hashlib.sha256()
    _feed(hasher, function, depth=0, seen=set(), by_name=by_name)
    return hasher.hexdigest()[:16]


def _feed(hasher: Any, value: Any, *, depth: int, seen: set, by_name: bool = True) -> None:
    """Add ``value`` to ``hasher``: code, data and the structure between them."""
    put = hasher.update
    if depth > _DEPTH:
        put(b"<deep>")
        return
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        put(f"{type(value).__name__}:{value!r};".encode())
        return
    if id(value) in seen:  # a cycle (a recursive function, an object holding itself)
        put(b"<seen>")
        return
    seen = seen | {id(value)}
    if isinstance(value, (tuple, list, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        put(f"{type(value).__name__}[{len(items)}](".encode())
        for item in items:
            _feed(hasher, item, depth=depth + 1, seen=seen, by_name=by_name)
        put(b")")
        return
    if isinstance(value, dict):
        put(f"dict[{len(value)}](".encode())
        for key in sorted(value, key=repr):
            _feed(hasher, key, depth=depth + 1, seen=seen, by_name=by_name)
            _feed(hasher, value[key], depth=depth + 1, seen=seen, by_name=by_name)
        put(b")")
        return
    if isinstance(value, types.ModuleType):
        put(f"module:{value.__name__};".encode())
        return
    if isinstance(value, functools.partial):
        put(b"partial(")
        for part in (value.func, value.args, value.keywords):
            _feed(hasher, part, depth=depth + 1, seen=seen, by_name=by_name)
        put(b")")
        return
    if isinstance(value, types.MethodType):
        put(b"method(")
        _feed(hasher, value.__func__, depth=depth + 1, seen=seen, by_name=by_name)
        _feed(hasher, value.__self__, depth=depth + 1, seen=seen, by_name=by_name)
        put(b")")
        return
    if by_name and isinstance(value, (types.FunctionType, type)) and _own_name(value) is not None:  # not its code
        put(f"trak-core:{type(value).__name__}:{_own_name(value)};".encode())
        return
    if isinstance(value, types.FunctionType):
        _feed_function(hasher, value, depth=depth, seen=seen, by_name=by_name)
        return
    if isinstance(value, (types.BuiltinFunctionType, type)):
        put(f"{type(value).__name__}:{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')};"
            .encode())
        return
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is not None and dtype is not None:  # an array of any framework: its values
        from .fingerprints import to_numpy

        try:
            array = to_numpy(value)
        except Exception:  # not an array after all
            array = None
        if array is not None:
            put(f"array:{array.dtype.str}{tuple(array.shape)}:".encode())
            put(array.tobytes())
            return
    own = _own_name(type(value)) if by_name else None  # an object of trak-core's: its class by name, its state
    put((f"object:trak-core.{own}(" if own is not None else
         f"object:{type(value).__module__}.{type(value).__qualname__}(").encode())  # a callable object, a setting
    call = getattr(type(value), "__call__", None)
    if own is None and isinstance(call, types.FunctionType):
        _feed_function(hasher, call, depth=depth + 1, seen=seen, by_name=by_name)
    state = getattr(value, "__dict__", None)
    _feed(hasher, state if isinstance(state, dict) else _stable_repr(value), depth=depth + 1, seen=seen,
          by_name=by_name)
    put(b")")


def _feed_function(hasher: Any, function: types.FunctionType, *, depth: int, seen: set, by_name: bool) -> None:
    import inspect

    code = function.__code__
    hasher.update(b"function(")
    try:  # the source, the same on any Python version (a lambda's is its whole line: the constants tell them apart)
        hasher.update(inspect.getsource(function).encode())
    except (OSError, TypeError):  # defined where no source is kept (python -c, a notebook's exec): the bytecode
        hasher.update(code.co_code)
    _feed_code(hasher, code)
    for part in (function.__defaults__, function.__kwdefaults__):
        _feed(hasher, part, depth=depth + 1, seen=seen, by_name=by_name)
    for cell in function.__closure__ or ():
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell (a name not bound yet)
            contents = "<empty>"
        _feed(hasher, contents, depth=depth + 1, seen=seen, by_name=by_name)
    for name in _global_names(code):  # the globals it reads: constants, functions, arrays (modules by name)
        if name in function.__globals__:
            hasher.update(f"global:{name}=".encode())
            _feed(hasher, function.__globals__[name], depth=depth + 1, seen=seen, by_name=by_name)
    hasher.update(b")")


def _feed_code(hasher: Any, code: types.CodeType) -> None:
    hasher.update(f"{code.co_argcount}:{code.co_names!r}".encode())
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):  # a nested function or comprehension
            _feed_code(hasher, constant)
        else:
            hasher.update(f"{type(constant).__name__}:{constant!r};".encode())


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names.extend(_global_names(constant))
    return sorted(set(names))


def task_functions(task: Any) -> str | None:
    """A custom task's identity as stores written before ``task_identity`` recorded it (``module.qualname#`` and a
    hash of each function's source); kept to reopen them. ``None`` for the built-in tasks."""
    from .tasks import TASKS, CustomTask

    if type(task) in {type(builtin) for builtin in TASKS.values()}:
        return None

    def named(function: Any) -> str:
        if function is None:
            return "-"
        import hashlib
        import inspect

        qualname = getattr(function, "__qualname__", type(function).__qualname__)
        try:  # the source tells two lambdas of one module apart, and is the same on any Python version
            source = "#" + hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:12]
        except (OSError, TypeError):  # defined where no source is kept (an interactive session)
            source = ""
        return f"{getattr(function, '__module__', '?')}.{qualname}{source}"

    if isinstance(task, CustomTask):
        return ", ".join(named(f) for f in (task._output, task._out_to_loss, task._output_grad))
    return named(type(task))


def task_identity(task: Any, *, output_grad: bool = False, by_name: bool = True) -> str | None:
    """What identifies a task beyond its name in a store's fingerprint: for a ``CustomTask``, what its ``output``
    and ``out_to_loss`` compute (``trak_core._task_identity``: their code, captured values and arguments; and
    ``output_grad``'s when ``output_grad``, for the analytic backend that uses it) and ``logits_ndim``; for another
    user ``Task`` class, every attribute its classes define (methods, helpers, class-level settings such as a
    subclass's ``ignore_index``) and its instance's attributes (``__slots__`` too); ``None`` for the built-in
    tasks. ``by_name=False``: trak-core's own code by its code, as stores written before recorded it."""
    from .tasks import TASKS, CustomTask

    if type(task) in {type(builtin) for builtin in TASKS.values()}:
        return None
    if isinstance(task, CustomTask):
        parts = [f"output={callable_digest(task._output, by_name=by_name)}",
                 f"out_to_loss={callable_digest(task._out_to_loss, by_name=by_name)}"]
        if output_grad:
            parts.append(f"output_grad={callable_digest(task._output_grad, by_name=by_name)}")
    else:
        parts = [f"class={_class_digest(type(task))}", f"state={callable_digest(_instance_state(task))}"]
    return ", ".join(parts + [f"logits_ndim={getattr(task, 'logits_ndim', None)}"])


def task_identity_before_classes(task: Any, *, output_grad: bool = False) -> str | None:
    """A task's identity as stores written before this rule recorded it, kept to reopen them: trak-core's own
    functions and objects digested by their code, and for a user ``Task`` class its ``output`` and ``out_to_loss``
    only (a changed class-level setting or helper method was not seen). ``None`` for the built-in tasks."""
    from .tasks import TASKS, CustomTask

    if type(task) in {type(builtin) for builtin in TASKS.values()}:
        return None
    if isinstance(task, CustomTask):
        return task_identity(task, output_grad=output_grad, by_name=False)
    parts = [f"{name}={callable_digest(getattr(type(task), name, None), by_name=False)}"
             for name in ("output", "out_to_loss")]
    state = vars(task) if hasattr(task, "__dict__") else None
    parts.append(f"state={callable_digest(state, by_name=False)}")
    return ", ".join(parts + [f"logits_ndim={getattr(task, 'logits_ndim', None)}"])


def _instance_state(task: Any) -> dict | None:
    """An instance's attributes: its ``__dict__`` and the values of its classes' ``__slots__``."""
    state = dict(vars(task)) if hasattr(task, "__dict__") else {}
    for klass in type(task).__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in ([slots] if isinstance(slots, str) else slots):
            if name not in ("__dict__", "__weakref__") and hasattr(task, name):
                state[f"slot:{name}"] = getattr(task, name)
    return state if state or hasattr(task, "__dict__") else None


def _stable_repr(value: Any) -> str:
    """``repr(value)``, but a type's name for one that shows an address (a lock, a plain object): the same in
    every process."""
    text = repr(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>" if " at 0x" in text else text


_PROTOCOL_NAMES = {"_abc_impl", "_is_protocol", "_is_runtime_protocol"}  # typing's bookkeeping (addresses in reprs)


def _class_digest(cls: type) -> str:
    """A 16-hex digest of what a class's attributes compute, along its MRO (not its name or module): each class's
    own attributes but dunders, methods by their code (trak-core's by name), properties by their functions."""
    hasher = hashlib.sha256()
    for klass in cls.__mro__:
        if klass is object or klass.__module__ == "typing":
            continue
        hasher.update(b"class(")
        for name in sorted(vars(klass)):
            if (name.startswith("__") and name.endswith("__")) or name in _PROTOCOL_NAMES:
                continue
            value = vars(klass)[name]
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            elif isinstance(value, functools.cached_property):  # its lock's repr holds an address (Python 3.11)
                value = value.func
            elif isinstance(value, property):
                value = (value.fget, value.fset, value.fdel)
            hasher.update(f"{name}=".encode())
            _feed(hasher, value, depth=1, seen=set())
        hasher.update(b")")
    return hasher.hexdigest()[:16]
