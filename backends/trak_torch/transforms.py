"""Make a model's forward one that ``torch.func`` transforms (``vmap``, ``grad``) can run, for their duration.

One job: set aside what training setups leave on a model that ``torch.func`` cannot run, and put it back after.

* Hugging Face's ``make_inputs_require_grads`` forward hook on the input embeddings (registered by
  ``enable_input_require_grads``, which ``gradient_checkpointing_enable`` calls, and which
  ``gradient_checkpointing_disable`` leaves in place; PEFT registers its own ``make_inputs_require_grad``) calls
  ``output.requires_grad_(True)``, which ``torch.func`` refuses. The hook only makes an embedding's output a node
  of the autograd graph when the embedding is frozen; ``torch.func.grad`` differentiates with respect to the
  parameters it is given either way, so the gradients do not depend on it. Its entry is replaced by a function that
  does nothing (the same key, so the hooks keep their order) and restored after.
* Gradient checkpointing (``torch.utils.checkpoint``) cannot run under ``torch.func`` either (saved tensor hooks,
  or an ``autograd.Function`` without ``setup_context``). Hugging Face layers checkpoint only in training mode, and
  the backend runs models in eval mode; every module's ``gradient_checkpointing`` flag (and timm's
  ``grad_checkpointing``, which timm checks in eval mode too) is also turned off for the duration, for ``vmap`` and
  for the closed form (whose hooks would run again in the recomputation), and restored after. Checkpointing changes
  memory, not values.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["for_transforms", "checkpointing_off", "input_grad_hooks"]

_HOOK_NAMES = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})  # Hugging Face's, PEFT's


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def input_grad_hooks(model: Any) -> list[tuple[dict, int]]:
    """``(hooks dict, key)`` of each forward hook of ``model``'s modules that makes an output require grad: the
    handles Hugging Face keeps (``_require_grads_hooks``, ``_require_grads_hook``) and hooks named as theirs."""
    found: dict[tuple[int, int], tuple[dict, int]] = {}
    for module in model.modules():
        handles = list(getattr(module, "_require_grads_hooks", None) or [])
        handles.append(getattr(module, "_require_grads_hook", None))
        for handle in handles:
            hooks = handle.hooks_dict_ref() if hasattr(handle, "hooks_dict_ref") else None
            if hooks is not None and handle.id in hooks:
                found[(id(hooks), handle.id)] = (hooks, handle.id)
        for key, hook in module._forward_hooks.items():
            if getattr(hook, "__name__", None) in _HOOK_NAMES:
                found[(id(module._forward_hooks), key)] = (module._forward_hooks, key)
    return list(found.values())


FLAGS = ("gradient_checkpointing", "grad_checkpointing")  # Hugging Face's, timm's (checked in eval mode too)


@contextmanager
def checkpointing_off(model: Any, modules: list[Any] | None = None) -> Iterator[None]:
    """Every module's gradient checkpointing flag (Hugging Face's ``gradient_checkpointing``, timm's
    ``grad_checkpointing``) off for the duration, restored after, also on errors. ``torch.func`` cannot run
    ``torch.utils.checkpoint``, and the closed form's forward hooks would run again in its recomputation.
    ``modules``: ``list(model.modules())`` where the caller has walked the tree already (``eval_mode``)."""
    flags = [(module, name, name in vars(module), getattr(module, name))
             for module in (model.modules() if modules is None else modules)
             for name in FLAGS if isinstance(getattr(module, name, None), bool)]
    try:
        for module, name, _, _ in flags:
            setattr(module, name, False)
        yield
    finally:
        for module, name, own, value in flags:
            if own:
                setattr(module, name, value)
            else:  # a class attribute (GradientCheckpointingLayer's default): read through the class again
                vars(module).pop(name, None)


@contextmanager
def for_transforms(model: Any) -> Iterator[None]:
    """``model`` without its input-grad hooks and with gradient checkpointing off (see the module); both restored
    after, also on errors."""
    hooks = [(table, key, table[key]) for table, key in input_grad_hooks(model)]
    try:
        for table, key, _ in hooks:
            table[key] = _nothing
        with checkpointing_off(model):
            yield
    finally:
        for table, key, hook in hooks:
            if key in table:  # not removed meanwhile
                table[key] = hook
