"""The rest's per-example gradients inside the factorized projection's batched pass.

One job: let :mod:`trak_torch.kronecker` keep one batched backward pass (no ``vmap``) when the rest (the
parameters outside factorizable layers, projected densely) is made of norm layers' gains and biases and of bare
parameters broadcast over the batch: layer norms, RMS norms (torch's and Hugging Face's), group and batch norms
with running statistics; class tokens and position embeddings ``(1, T, d)``, layer scales ``(C, 1, 1)``. A norm
layer's call gets a zero perturbation on its output, and its input normalized without the affine parameters
(``xhat``) is kept; its gain's per-example gradient is ``sum_t delta_t * xhat_t`` over the positions that share a
gain, its bias's ``sum_t delta_t`` (as :mod:`trak_torch.closed_form` computes them). A bare parameter is passed as
``n`` copies that require gradients. A parameter of the rest that no op uses (a table whose module is never called,
as an untied BART's ``model.shared``) has zero gradients as long as autograd finds no use of it; a batch that uses it
(a sliced table) raises ``NotPerExample`` and takes ``vmap``. Once per checkpoint these gradients are checked
against plain autograd one example at a time (``check``); any other rest (a 1-D scale, a norm with its own
``forward``) keeps ``vmap``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RestPlan", "rest_plan", "RestPass", "check"]


@dataclass
class RestPlan:
    """The rest's norm layers (module -> ``(kind, weight, bias)``), bare parameters given as copies, and the other
    parameters (zero gradients while no op uses them)."""

    norms: dict[Any, tuple[str, str, str | None]]
    copied: list[str]
    unused: tuple[str, ...] = ()


def rest_plan(backend: Any, model: Any, prepared: Any, plan: Any, inputs: Any, causal: bool) -> RestPlan | None:
    """How the batched pass gives the rest's gradients, or ``None`` when part of the rest is neither a norm layer's
    gain or bias nor a bare parameter broadcast over the batch."""
    from .closed_form_layers import norm_kind
    from .closed_form_functional import bare_names
    from .kronecker_plan import find_uses

    rest = set(plan.rest)
    norms = {use.module: (use.kind, use.weight, use.bias if use.bias in rest else None)
             for use in find_uses(backend, model, prepared, inputs, causal, kind=norm_kind).values()
             if use.weight in rest}
    covered = {name for _, weight, bias in norms.values() for name in (weight, bias) if name}
    weights = [weight for _, weight, _ in norms.values()]
    if len(set(weights)) != len(weights):  # a gain shared by two norm layers: vmap
        return None
    unused = tuple(sorted(name for name in rest - covered if bare_names(prepared, {name}) is None))
    bare = bare_names(prepared, rest - covered - set(unused)) or ([], [])
    if bare[1]:  # a 1-D bare parameter (a scale) needs the closed form's torch function mode
        return None
    return RestPlan(norms, bare[0], unused)


class RestPass:
    """The hooks and copies of one batched pass on ``n`` examples, then the rest's gradients ``(n, n_rest)``."""

    def __init__(self, found: RestPlan, prepared: Any, n: int) -> None:
        from .closed_form_functional import copies

        self.found, self.prepared, self.n = found, prepared, n
        self.copies = {name: copies(prepared.params[name], n) for name in found.copied}
        self.unused = {name: prepared.params[name].detach().requires_grad_(True) for name in found.unused}
        self.calls: list[tuple[Any, Any, Any]] = []  # (module, xhat, z)

    def params(self) -> dict[str, Any]:
        """The parameters to call the model with: the bare ones as their copies, the unused ones as aliases whose
        uses autograd reports."""
        return {**self.prepared.params, **self.copies, **self.unused}

    def hook(self, module: Any, args: Any, out: Any) -> Any:
        """A norm layer's call: keep ``xhat`` (with the buffers of this call) and perturb the output."""
        import torch

        from .closed_form import NotPerExample
        from .closed_form_layers import TOKENWISE, normalized

        kind, rows = self.found.norms[module][0], out.shape[0] if out.ndim else 0
        tokens = kind in TOKENWISE and rows and not rows % self.n and args and args[0].shape[0] == rows
        if not args or (rows != self.n and not tokens):  # tokens: flattened example-major, (n * T, d), as OPT's
            raise NotPerExample(f"a {type(module).__name__} is called on {tuple(out.shape)}, not on {self.n} examples")
        with torch.no_grad():
            xhat = normalized(module, kind, args[0].detach())
        z = torch.zeros_like(out, requires_grad=True)
        self.calls.append((module, xhat, z))
        return out + z

    def perturbations(self) -> list[Any]:
        return [z for _, _, z in self.calls] + list(self.copies.values()) + list(self.unused.values())

    def gradients(self, deltas: list[Any], names: tuple[str, ...]) -> Any:
        """The rest's per-example gradients ``(n, n_rest)`` in ``names`` order, from the perturbations' gradients."""
        import torch

        from .closed_form import NotPerExample
        from .closed_form_layers import NORMS

        n, params, grads = self.n, self.prepared.params, {}
        used = [name for name, delta in zip(self.unused, deltas[len(self.calls) + len(self.copies):])
                if delta is not None]
        if used:
            raise NotPerExample(f"{used[0]} {tuple(params[used[0]].shape)} of the rest is used by an operation the "
                                "batched pass does not follow (it is not a norm layer's, nor a bare parameter "
                                "broadcast over the batch)")

        def add(name: str, value: Any) -> None:
            grads[name] = value if name not in grads else grads[name] + value

        for (module, xhat, z), delta in zip(self.calls, deltas):
            delta = torch.zeros_like(z) if delta is None else delta
            kind, weight, bias = self.found.norms[module]
            width = params[weight].numel()  # positions sharing one gain: dim 1 of (n, C, ...), or the last dims
            d, x = ((delta.reshape(n, width, -1), xhat.reshape(n, width, -1)) if kind in NORMS[:2] else
                    (delta.reshape(n, -1, width).transpose(1, 2), xhat.reshape(n, -1, width).transpose(1, 2)))
            add(weight, (d * x).sum(2))
            if bias:
                add(bias, d.sum(2))
        for name, delta in zip(self.copies, deltas[len(self.calls):]):
            add(name, torch.zeros_like(self.copies[name]) if delta is None else delta)
        return torch.cat([grads[name].reshape(n, -1) if name in grads else
                          torch.zeros((n, params[name].numel()), dtype=params[name].dtype, device=params[name].device)
                          for name in names], dim=1)


def check(backend: Any, model: Any, rest: Any, inputs: Any, labels: Any, task: Any, causal: bool, got: Any,
          dtype: Any) -> tuple[bool, float, float]:
    """``(right, error, tolerance)``: the batched pass's rest gradients ``got`` of the first rows of ``inputs``
    against plain autograd one example at a time (``rest``: the rest as a checkpoint of its own)."""
    import torch

    from .closed_form import check_tolerance
    from .looped import looped_gradients

    reference = looped_gradients(backend, model, rest, inputs, labels, task, causal).to(got.dtype)
    scale = float(torch.linalg.vector_norm(reference)) or 1.0
    error, tolerance = float(torch.linalg.vector_norm(got - reference)) / scale, check_tolerance(dtype, rest.device)
    return error <= tolerance, error, tolerance
