"""Models whose per-example gradients are written by hand over the Array API.

One job: the reference backend's models. They run unchanged on numpy, array-api-strict, CuPy,
torch or JAX arrays, and their gradients are the ground truth the autodiff backends are checked
against.

Parameter order (the flat gradient vector, and a flat checkpoint) follows ``param_shapes``:
each array in row-major (C) order, one after another, with torch's ``nn.Linear`` layout
(``weight`` is ``(out_features, in_features)``, then ``bias``):

- ``SoftmaxRegression``: ``weight (C, d)``, ``bias (C,)``.
- ``MLP``: ``hidden.weight (H, d)``, ``hidden.bias (H,)``, ``output.weight (C, H)``,
  ``output.bias (C,)``; ``h = tanh(x W1^T + b1)`` (or ReLU), ``logits = h W2^T + b2``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from ._namespace import namespace
from .errors import TrakTypeError, TrakValueError

__all__ = ["AnalyticModel", "SoftmaxRegression", "MLP"]


class AnalyticModel:
    """Base class: a model with named parameter arrays and hand-written gradients."""

    param_shapes: dict[str, tuple[int, ...]]
    n_outputs: int
    n_features: int

    @property
    def n_params(self) -> int:
        """Total number of parameters ``p``."""
        return sum(math.prod(shape) for shape in self.param_shapes.values())

    def params(self, checkpoint: Any) -> dict[str, Any]:
        """Named parameter arrays from a checkpoint: a flat vector of length ``p`` or a mapping.

        Parameters
        ----------
        checkpoint : array or mapping of str to array
            A flat vector of shape (p,), or a mapping with the names and shapes of ``param_shapes``.

        Returns
        -------
        dict of str to array
            The arrays, in ``param_shapes`` order.

        Raises
        ------
        TrakValueError
            If the checkpoint's names, shapes or parameter count do not match this model.
        TrakTypeError
            If the checkpoint is neither an array nor a mapping (``None``, a list).
        """
        if isinstance(checkpoint, Mapping):
            missing = [n for n in self.param_shapes if n not in checkpoint]
            extra = [n for n in checkpoint if n not in self.param_shapes]
            if missing or extra:
                raise TrakValueError(f"checkpoint names do not match the model: missing {missing}, "
                                     f"unexpected {extra}; expected {list(self.param_shapes)}")
            out = {}
            for name, shape in self.param_shapes.items():
                if tuple(checkpoint[name].shape) != shape:
                    raise TrakValueError(f"checkpoint[{name!r}] has shape {tuple(checkpoint[name].shape)}, "
                                         f"the model expects {shape}")
                out[name] = checkpoint[name]
            return out
        if not hasattr(checkpoint, "shape"):
            raise TrakTypeError(f"a checkpoint of an analytic model is a flat parameter vector of shape "
                                f"({self.n_params},) or a mapping of {list(self.param_shapes)} to arrays, got "
                                f"{type(checkpoint).__name__}" + (" (an analytic model holds no weights of its own: "
                                                                  "pass them, e.g. model.init(seed=0))"
                                                                  if checkpoint is None else ""))
        xp = namespace(checkpoint)
        if checkpoint.ndim != 1 or checkpoint.shape[0] != self.n_params:
            raise TrakValueError(f"a flat checkpoint must have shape ({self.n_params},) for this model "
                                 f"(its parameter count); got shape {tuple(checkpoint.shape)}")
        out, start = {}, 0
        for name, shape in self.param_shapes.items():
            size = math.prod(shape)
            out[name] = xp.reshape(checkpoint[start:start + size], shape)
            start += size
        return out

    def flatten(self, params: Mapping[str, Any]) -> Any:
        """Concatenate named parameters into the flat vector, in the documented order.

        Parameters
        ----------
        params : mapping of str to array
            Arrays with the names and shapes of ``param_shapes``.

        Returns
        -------
        array, shape (p,)
            The flat parameter vector.
        """
        xp = namespace(*params.values())
        return xp.concat([xp.reshape(params[name], (-1,)) for name in self.param_shapes])

    def init(self, seed: int = 0, dtype: str = "float64") -> Any:
        """A flat NumPy parameter vector, uniform in ``+-1/sqrt(fan_in)`` like ``nn.Linear``.

        Parameters
        ----------
        seed : int
            Seed of ``numpy.random.default_rng``.
        dtype : str
            The vector's dtype.

        Returns
        -------
        numpy.ndarray, shape (p,)
            A checkpoint for ``params``.
        """
        import numpy as np

        rng = np.random.default_rng(seed)
        parts = []
        for name, shape in self.param_shapes.items():
            fan_in = self.fan_in(name)
            bound = 1.0 / math.sqrt(fan_in)
            parts.append(rng.uniform(-bound, bound, size=math.prod(shape)))
        return np.concatenate(parts).astype(dtype)

    def fan_in(self, name: str) -> int:
        """Inputs feeding the layer that owns parameter ``name`` (subclasses define it).

        Parameters
        ----------
        name : str
            A parameter name of ``param_shapes``.
        """
        raise NotImplementedError

    def logits(self, params: Mapping[str, Any], inputs: Any) -> Any:
        """Raw outputs, shape ``(n, n_outputs)`` (subclasses define it).

        Parameters
        ----------
        params : mapping of str to array
            Named parameter arrays (``params`` of a checkpoint).
        inputs : array, shape (n, n_features)
            The examples.
        """
        raise NotImplementedError

    def per_example_grads(self, params: Mapping[str, Any], inputs: Any, dlogits: Any) -> Any:
        """Rows ``J_i^T dlogits_i``: gradients of ``sum_c dlogits[i, c] * logits[i, c]``, shape (n, p).

        Parameters
        ----------
        params : mapping of str to array
            Named parameter arrays (``params`` of a checkpoint).
        inputs : array, shape (n, n_features)
            The examples.
        dlogits : array, shape (n, n_outputs)
            The derivative of each example's output with respect to its logits (``task.output_grad``).
        """
        raise NotImplementedError

    def batch_grad(self, params: Mapping[str, Any], inputs: Any, dlogits: Any) -> Any:
        """The sum over examples of ``per_example_grads``, without forming the (n, p) array; shape (p,).

        Parameters
        ----------
        params : mapping of str to array
            Named parameter arrays (``params`` of a checkpoint).
        inputs : array, shape (n, n_features)
            The examples.
        dlogits : array, shape (n, n_outputs)
            The derivative of each example's output with respect to its logits (``task.output_grad``).
        """
        raise NotImplementedError

    def _check_inputs(self, inputs: Any) -> None:
        if inputs.ndim != 2 or inputs.shape[1] != self.n_features:
            raise TrakValueError(f"inputs must have shape (n, {self.n_features}) for this model, "
                                 f"got {tuple(inputs.shape)}")


def _sizes(model: str, **sizes: Any) -> tuple[int, ...]:
    """``sizes`` as Python ints, each a positive integer (NumPy's too, not a bool or a float), else an error naming
    it: a size of 0 or less made a model of a negative parameter count, or one whose ``init`` divided by zero."""
    from ._checks import _integer  # (not at the top: _checks imports the backends, which import this module)

    out = []
    for name, value in sizes.items():
        number = _integer(value)
        if number is None or number < 1:
            raise TrakValueError(f"{model}: {name} must be a positive integer, got {value!r}")
        out.append(number)
    return tuple(out)


def _outer_rows(left: Any, right: Any, *, xp: Any) -> Any:
    """Per-row outer products flattened: ``(n, a), (n, b) -> (n, a * b)``."""
    n = left.shape[0]
    return xp.reshape(left[:, :, None] * right[:, None, :], (n, left.shape[1] * right.shape[1]))


class SoftmaxRegression(AnalyticModel):
    """Linear classifier ``logits = x W^T + b`` (multinomial logistic regression).

    Parameters
    ----------
    n_features : int
        Input dimension ``d``.
    n_classes : int
        Number of classes ``C`` (the outputs).
    """

    def __init__(self, n_features: int, n_classes: int) -> None:
        self.n_features, self.n_outputs = _sizes("SoftmaxRegression", n_features=n_features, n_classes=n_classes)
        self.param_shapes = {"weight": (self.n_outputs, self.n_features), "bias": (self.n_outputs,)}

    def fan_in(self, name: str) -> int:
        """``n_features``, for ``weight`` and ``bias`` alike (``AnalyticModel.fan_in``)."""
        return self.n_features

    def logits(self, params: Mapping[str, Any], inputs: Any) -> Any:
        """Raw outputs ``x W^T + b``, shape ``(n, n_classes)`` (``AnalyticModel.logits``)."""
        self._check_inputs(inputs)
        xp = namespace(inputs)
        return inputs @ xp.matrix_transpose(params["weight"]) + params["bias"]

    def per_example_grads(self, params: Mapping[str, Any], inputs: Any, dlogits: Any) -> Any:
        """Rows ``[dlogits_i x_i^T, dlogits_i]``: ``d W`` (``C x d``, row-major) then ``d b``
        (``AnalyticModel.per_example_grads``)."""
        xp = namespace(inputs, dlogits)
        return xp.concat([_outer_rows(dlogits, inputs, xp=xp), dlogits], axis=1)

    def batch_grad(self, params: Mapping[str, Any], inputs: Any, dlogits: Any) -> Any:
        """``dlogits^T x`` (row-major) then the column sums of ``dlogits`` (``AnalyticModel.batch_grad``)."""
        xp = namespace(inputs, dlogits)
        grad_w = xp.matrix_transpose(dlogits) @ inputs
        return xp.concat([xp.reshape(grad_w, (-1,)), xp.sum(dlogits, axis=0)])


class MLP(AnalyticModel):
    """One-hidden-layer perceptron ``logits = act(x W1^T + b1) W2^T + b2``; ``act`` is tanh or relu.

    Parameters
    ----------
    n_features : int
        Input dimension ``d``.
    n_hidden : int
        Hidden units ``H``.
    n_classes : int
        Number of classes ``C`` (the outputs).
    activation : {"tanh", "relu"}
        The hidden layer's ``act``.
    """

    def __init__(self, n_features: int, n_hidden: int, n_classes: int, activation: str = "tanh") -> None:
        if activation not in ("tanh", "relu"):
            raise TrakValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")
        self.n_features, self.n_hidden, self.n_outputs = _sizes("MLP", n_features=n_features, n_hidden=n_hidden,
                                                                n_classes=n_classes)
        self.activation = activation
        self.param_shapes = {
            "hidden.weight": (self.n_hidden, self.n_features), "hidden.bias": (self.n_hidden,),
            "output.weight": (self.n_outputs, self.n_hidden), "output.bias": (self.n_outputs,),
        }

    def fan_in(self, name: str) -> int:
        """``n_features`` for ``hidden.*``, ``n_hidden`` for ``output.*`` (``AnalyticModel.fan_in``)."""
        return self.n_features if name.startswith("hidden") else self.n_hidden

    def _hidden(self, params: Mapping[str, Any], inputs: Any, *, xp: Any) -> Any:
        pre = inputs @ xp.matrix_transpose(params["hidden.weight"]) + params["hidden.bias"]
        return xp.tanh(pre) if self.activation == "tanh" else xp.maximum(pre, xp.zeros_like(pre))

    def _backward(self, params: Mapping[str, Any], inputs: Any, dlogits: Any, *, xp: Any) -> tuple[Any, Any]:
        hidden = self._hidden(params, inputs, xp=xp)
        dhidden = dlogits @ params["output.weight"]
        if self.activation == "tanh":
            dpre = dhidden * (1.0 - hidden * hidden)
        else:
            dpre = xp.where(hidden > 0, dhidden, xp.zeros_like(dhidden))
        return hidden, dpre

    def logits(self, params: Mapping[str, Any], inputs: Any) -> Any:
        """Raw outputs ``act(x W1^T + b1) W2^T + b2``, shape ``(n, n_classes)`` (``AnalyticModel.logits``)."""
        self._check_inputs(inputs)
        xp = namespace(inputs)
        hidden = self._hidden(params, inputs, xp=xp)
        return hidden @ xp.matrix_transpose(params["output.weight"]) + params["output.bias"]

    def per_example_grads(self, params: Mapping[str, Any], inputs: Any, dlogits: Any) -> Any:
        """Backpropagated by hand; per row the gradients of ``hidden.weight`` (row-major), ``hidden.bias``,
        ``output.weight``, ``output.bias`` (``AnalyticModel.per_example_grads``)."""
        xp = namespace(inputs, dlogits)
        hidden, dpre = self._backward(params, inputs, dlogits, xp=xp)
        return xp.concat([_outer_rows(dpre, inputs, xp=xp), dpre,
                          _outer_rows(dlogits, hidden, xp=xp), dlogits], axis=1)

    def batch_grad(self, params: Mapping[str, Any], inputs: Any, dlogits: Any) -> Any:
        """The four parameters' gradients summed over the examples, in ``param_shapes`` order, without forming
        the (n, p) array (``AnalyticModel.batch_grad``)."""
        xp = namespace(inputs, dlogits)
        hidden, dpre = self._backward(params, inputs, dlogits, xp=xp)
        flat = lambda a: xp.reshape(a, (-1,))  # noqa: E731
        return xp.concat([flat(xp.matrix_transpose(dpre) @ inputs), xp.sum(dpre, axis=0),
                          flat(xp.matrix_transpose(dlogits) @ hidden), xp.sum(dlogits, axis=0)])
