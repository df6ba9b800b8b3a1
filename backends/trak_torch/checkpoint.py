"""Turn a ``state_dict`` (or ``None``) into the parameter snapshot the gradients are taken at.

One job: validate and snapshot checkpoints for ``trak_torch.TorchBackend`` (and say how a batch's dtype differs
from theirs: ``dtype_error``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from trak_core.errors import TrakTypeError, TrakValueError, non_finite_parameters

log = logging.getLogger("trak_core")


@dataclass
class TorchCheckpoint:
    """Parameters to differentiate (``params``, in ``named_parameters`` order) and the rest (``frozen``)."""

    params: dict[str, Any]
    frozen: dict[str, Any]
    device: Any
    dtype: Any

    @property
    def n_params(self) -> int:
        return sum(int(t.numel()) for t in self.params.values())


def select_names(model: Any, params: Sequence[str] | Callable[[str, Any], bool] | None) -> list[str]:
    """Names of the parameters to differentiate, in ``model.named_parameters()`` order."""
    named = dict(model.named_parameters())
    if params is None:
        return list(named)
    if callable(params):
        chosen = [name for name, tensor in named.items() if params(name, tensor)]
    else:
        unknown = [name for name in params if name not in named]
        if unknown:
            raise TrakValueError(f"params names {unknown} are not parameters of the model; "
                                 f"its parameters are {list(named)}")
        chosen = [name for name in named if name in set(params)]
    if not chosen:
        raise TrakValueError("params selects no parameter of the model; nothing to differentiate")
    return chosen


def _tied_aliases(model: Any) -> dict[str, str]:
    """``alias -> owner``: the names under which a parameter appears a second time (tied weights), each with the
    name ``named_parameters`` lists it under first."""
    owners = {id(tensor): name for name, tensor in model.named_parameters()}
    return {name: owners[id(tensor)] for name, tensor in model.named_parameters(remove_duplicate=False)
            if owners[id(tensor)] != name}


def snapshot(model: Any, checkpoint: Mapping[str, Any] | None, names: list[str]) -> TorchCheckpoint:
    """Copy ``checkpoint`` (or the model's current state when ``None``) onto the model's device."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TrakTypeError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
    attributed = {id(tensor) for name, tensor in model.named_parameters() if name in names}
    renormalized = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)
                    and module.max_norm is not None and id(module.weight) in attributed]
    if renormalized:
        raise TrakValueError(f"embeddings {renormalized} have max_norm set: their forward renormalizes the table's rows "
                             "in place, which per-example gradients of the table cannot follow (vmap cannot run it); "
                             "set max_norm=None on them for attribution (training has renormalized the rows "
                             "already), or leave their weights out with TorchBackend(params=...)")
    lazy = [name for name, tensor in model.named_parameters()
            if isinstance(tensor, torch.nn.parameter.UninitializedParameter)]
    if lazy:
        raise TrakValueError(f"the model's parameters {lazy[:3]} are not materialized yet (lazy modules): run one "
                             "forward on a batch first (or load a state_dict into the materialized model)")
    meta = [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]
    if meta:
        raise TrakValueError(f"the model's tensors {meta[:3]} are on the meta device (no values): materialize it "
                             "first, e.g. model.to_empty(device='cpu') then model.load_state_dict(state_dict)")
    reference = model.state_dict(keep_vars=True)
    first = next(iter(model.parameters()), None)
    if first is None:
        raise TrakValueError("the model has no parameters")
    device, dtype = first.device, first.dtype
    aliases = _tied_aliases(model)
    if checkpoint is None:
        state = reference
    else:
        if not isinstance(checkpoint, Mapping):
            hint = (": load it first, e.g. torch.load(path, map_location='cpu')"
                    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__") else "")
            raise TrakTypeError(f"a torch checkpoint must be a state_dict (a mapping of names to tensors) or None, "
                                f"got {type(checkpoint).__name__}{hint}")
        # a tied alias left out (as safetensors saves them) is never read, nor is a BatchNorm's count (older
        missing = [k for k in reference if k not in checkpoint and k not in aliases
                   and not k.endswith("num_batches_tracked")]  # checkpoints): torch's load_state_dict takes both
        extra = [k for k in checkpoint if k not in reference]
        if missing or extra:
            raise TrakValueError(_mismatch(missing, extra, len(reference)))
        differ = [(alias, owner) for alias, owner in aliases.items() if alias in checkpoint and owner in checkpoint
                  and not torch.equal(torch.as_tensor(checkpoint[alias]), torch.as_tensor(checkpoint[owner]))]
        if differ:
            raise TrakValueError(f"state_dict[{differ[0][0]!r}] differs from state_dict[{differ[0][1]!r}], which the "
                                 "model ties to it (one Parameter under both names): the model holds one value for "
                                 "both, so one of them would be dropped; featurize the tied model's own state_dict, "
                                 "or untie the weights in the model")
        state = checkpoint
    params, frozen = {}, {}
    for name, ref in reference.items():
        if name in aliases:  # a tied weight (GPT-2's lm_head.weight is wte.weight): set through its owner
            continue
        value = torch.as_tensor(state[name] if name in state else ref)  # a count left out: the model's
        if tuple(value.shape) != tuple(ref.shape):
            raise TrakValueError(f"state_dict[{name!r}] has shape {tuple(value.shape)}, the model's is "
                                 f"{tuple(ref.shape)}")
        value = value.detach().to(device=ref.device, dtype=ref.dtype, copy=True)
        (params if name in names else frozen)[name] = value
    if not torch.all(torch.stack([torch.isfinite(t).all() for t in params.values()])):
        raise non_finite_parameters([name for name, t in params.items() if not bool(torch.isfinite(t).all())])
    nan = [name for name, t in frozen.items() if t.is_floating_point() and bool(torch.isnan(t).any())]
    if nan:  # buffers (BatchNorm statistics) and parameters left out: used, they make every output NaN
        log.warning("trak-core: the checkpoint's tensors %s%s, which are not attributed, contain NaN: where the "
                    "model uses them its outputs are NaN", nan[:5], f" and {len(nan) - 5} more" if len(nan) > 5 else "")
    return TorchCheckpoint({n: params[n] for n in names}, frozen, device, dtype)


def _mismatch(missing: list[str], extra: list[str], n_keys: int) -> str:
    """A state_dict whose keys are not the model's: the first keys of each kind, and what a checkpoint must be."""
    def some(keys: list[str]) -> str:
        return f"{keys[:5]}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    message = (f"state_dict does not match the model: missing keys {some(missing)} ({len(missing)} of the model's "
               f"{n_keys}), unexpected keys {some(extra)}")
    prefix = _common_prefix(missing, extra)
    if prefix:
        return (f"{message}. Every key has the extra prefix {prefix!r} (as DistributedDataParallel, DataParallel or "
                "torch.compile and AveragedModel save them): strip it, e.g. {k.removeprefix(%r): v for k, v in "
                "state.items() if k.startswith(%r)}, or save the unwrapped model's state_dict" % (prefix, prefix))
    prefix = _common_prefix(extra, missing)
    if prefix:
        return (f"{message}. The model's keys have the extra prefix {prefix!r}: it is wrapped "
                "(DistributedDataParallel, DataParallel, torch.compile); pass the unwrapped model (model.module, or "
                "model._orig_mod)")
    nested = [key for key in extra if key in ("state_dict", "model", "model_state_dict", "module")]
    if nested and len(extra) <= 8:
        return (f"{message}. The checkpoint looks like a training checkpoint that holds the state_dict under "
                f"{nested[0]!r}: pass checkpoint[{nested[0]!r}]")
    if not missing:
        return message
    return (f"{message}. A checkpoint is the full state_dict of the model (model.state_dict(): every parameter, "
            "frozen ones included, and buffers), not a part of it. For an adapter-only state dict (PEFT's "
            "get_peft_model_state_dict, a saved LoRA adapter): load it into the model first "
            "(peft.set_peft_model_state_dict(model, adapter_state)), then pass a copy of the whole state, "
            "{k: v.clone() for k, v in model.state_dict().items()}, or None for the model's current weights")


def _common_prefix(missing: list[str], extra: list[str]) -> str | None:
    """The prefix (such as ``module.`` or ``_orig_mod.``) that turns every missing key into an unexpected one (other
    unexpected keys may come with them: ``AveragedModel``'s ``n_averaged``)."""
    if not missing or len(missing) > len(extra):
        return None
    for key in extra:  # the key that is missing[0] behind a prefix, wherever it comes in the order
        first = key.removesuffix(missing[0]) if key.endswith(missing[0]) and key != missing[0] else None
        if first and {first + name for name in missing} <= set(extra):
            return first
    return None


_CONVERSIONS = {"float32": "float", "float64": "double", "float16": "half", "bfloat16": "bfloat16"}


def dtype_error(inputs: Any, dtype: Any, exc: Exception) -> TrakTypeError:
    """A dtype mismatch between a floating batch and the model's parameters, with the fix."""
    batch, model = str(inputs.dtype).removeprefix("torch."), str(dtype).removeprefix("torch.")
    to_model = f"inputs.{_CONVERSIONS[model]}()" if model in _CONVERSIONS else f"inputs.to(torch.{model})"
    to_batch = f"model.{_CONVERSIONS[batch]}()" if batch in _CONVERSIONS else f"model.to(torch.{batch})"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not inputs.is_floating_point():  # integer or boolean inputs to a model whose first layer takes numbers
        return TrakTypeError(f"inputs are {batch} but the model's parameters are {model} (torch: {first}); a model "
                             f"whose first layer is not an embedding takes floating inputs: convert the batch with "
                             f"{to_model}")
    return TrakTypeError(f"inputs are {batch} but the model's parameters are {model} (torch: {first}); convert "
                         f"the batch with {to_model}, or the model with {to_batch}")


def raise_dtype_error(exc: Exception, prepared: Any, inputs: Any) -> None:
    """Raise ``dtype_error`` for ``exc`` when it is a dtype mismatch (torch's message says so) and a floating input's
    dtype differs from the parameters' (else return: the caller re-raises ``exc``)."""
    text = str(exc).lower()
    if "cannot be converted to type float without overflow" in text and str(prepared.dtype) == "torch.float64" and \
            hasattr(exc, "add_note"):  # XGLM: torch.full((), finfo(float64).min) without dtype= makes a float32
        exc.add_note(f"trak-core: the model's own code made a float32 tensor from a {prepared.dtype} value it cannot "
                     "hold (a mask's smallest value: transformers' XGLM calls torch.full without dtype=); call "
                     f"torch.set_default_dtype({prepared.dtype}) before featurizing, or use a float32 model")
        return
    if not any(word in text for word in ("dtype", "scalar type", "should be the same", "same type")):  # OOM, shapes..
        return
    floating = [v for v in (inputs.values() if isinstance(inputs, Mapping) else [inputs])
                if v.is_floating_point() and v.dtype != prepared.dtype]
    if floating:
        raise dtype_error(floating[0], prepared.dtype, exc) from exc
    if not isinstance(inputs, Mapping) and not inputs.is_floating_point() and not inputs.is_complex():
        raise dtype_error(inputs, prepared.dtype, exc) from exc  # integer images or tabular data


def prepared_dtype(params: dict) -> Any:
    """The floating dtype of a parameter dict (float32 when it has none)."""
    import torch

    for value in params.values():
        if value.is_floating_point():
            return value.dtype
    return torch.float32


def module_classes(model: Any) -> str:
    """The model's class, its module count and a hash of every module's name and class (``named_modules``):
    ``"Net (4 modules, 1f0c2a9e7b3d)"``. A ``torch.compile``'d model is its eager module. Equal for the same
    architecture in any process; another activation module, or a subclass with its own ``forward``, differs.
    Modules that do nothing in eval mode, where attribution runs (dropout and drop-path of any rate, identities:
    ``nn.Dropout`` or ``nn.Identity`` for a LoRA dropout of 0.1 or 0), are left out."""
    import hashlib

    if type(model).__name__ == "OptimizedModule" and getattr(model, "_orig_mod", None) is not None:
        model = model._orig_mod
    modules = [f"{name}={type(module).__qualname__}" for name, module in model.named_modules()
               if not _no_op_in_eval(module)]
    digest = hashlib.sha256("\n".join(modules).encode()).hexdigest()[:12]
    return f"{type(model).__qualname__} ({len(modules)} modules, {digest})"


def _no_op_in_eval(module: Any) -> bool:
    """A module without parameters that passes its input through in eval mode: ``nn.Identity``, dropout of any
    kind (``nn.Dropout*``, ``nn.AlphaDropout``) and stochastic depth (timm's ``DropPath``, torchvision's
    ``StochasticDepth``), told by class name so that no library need be imported."""
    import torch

    name = type(module).__name__
    empty = next(module.parameters(recurse=False), None) is None
    return empty and (isinstance(module, (torch.nn.Identity, torch.nn.modules.dropout._DropoutNd))
                      or name in ("DropPath", "StochasticDepth", "Identity") or name.endswith("Dropout"))
