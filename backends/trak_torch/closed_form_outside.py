"""A layer's attributed weight used outside the layer's own call: the closed form would miss that part of its gradient.

One job: tell the closed form (:mod:`trak_torch.closed_form`) that a weight it takes from a layer's call is also
used elsewhere in the forward (``h @ self.embed.weight.T`` beside the embedding's own lookup). The closed form has a
weight's gradient only from the perturbations on its layers' outputs, so such a use is invisible to it; the check
against plain autograd finds it only where that part is large next to the check's tolerance (6-8% of a table's
gradients passed the 1e-2 of CUDA and half precision). Watched on the checked batch: while a torch function mode is
active, an op given an attributed weight or bias of a layer (or an original of a parametrized one) while none of
that tensor's layers is running raises ``NotPerExample``, and the checkpoint takes ``vmap``. Reading a tensor's
shape, dtype or device, and detaching it, are not uses.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["outside_uses"]

READS = {"dim", "size", "numel", "is_floating_point", "element_size", "__len__", "detach", "data_ptr",
         "untyped_storage", "storage_offset", "stride", "is_contiguous", "__hash__"}
ATTRIBUTES = {"dtype", "shape", "device", "requires_grad", "is_leaf", "grad_fn", "ndim", "is_cuda", "layout",
              "is_sparse", "is_meta", "is_quantized", "names", "_version", "grad", "itemsize"}  # not .T, .mT, .data


def _reads(func: Any) -> bool:
    """Whether ``func`` only reads about a tensor (its shape, dtype, device...), not its values."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: the descriptor's name
        return getattr(getattr(func, "__self__", None), "__name__", "") in ATTRIBUTES
    return name in READS


def _name(func: Any) -> str:
    """An op's name for a message: ``.T`` for a property, else the function's name."""
    name = getattr(func, "__name__", str(func))
    return f".{getattr(getattr(func, '__self__', None), '__name__', '?')}" if name == "__get__" else name


@contextmanager
def outside_uses(owners: dict[str, list[Any]], params: dict[str, Any], watch: bool = True,
                 who: str = "the closed form") -> Iterator[None]:
    """While active (``watch``), raise ``NotPerExample`` when a tensor ``params[name]`` (``name`` a key of
    ``owners``) is given to an op while none of ``owners[name]`` (its layers) is inside its ``forward``; ``who``:
    what does not see such a use, for the message."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    from .closed_form import NotPerExample

    if not watch or not owners:
        yield
        return
    watched = {id(params[name]): (params[name], name, set(map(id, modules))) for name, modules in owners.items()
               if name in params}
    running: list[int] = []  # ids of the layers inside their forward, innermost last

    def enter(module: Any, args: Any) -> None:
        running.append(id(module))

    def leave(module: Any, args: Any, output: Any) -> None:
        if running and running[-1] == id(module):
            running.pop()

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            if not _reads(func):
                for value in tree_leaves((args, kwargs)):
                    hit = watched.get(id(value))
                    if hit is not None and hit[0] is value and not hit[2] & set(running):
                        raise NotPerExample(f"{hit[1]} is used by {_name(func)} outside its layer's call, which "
                                            f"{who} does not see")
            return func(*args, **kwargs)

    modules = {id(module): module for modules_ in owners.values() for module in modules_}.values()
    handles = [module.register_forward_pre_hook(enter) for module in modules]
    handles += [module.register_forward_hook(leave, always_call=True) for module in modules]
    try:
        with Mode():
            yield
    finally:
        for handle in handles:
            handle.remove()
