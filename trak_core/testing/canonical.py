"""The canonical models every backend must agree on, their weights, and NumPy references.

One job: define the models of the conformance suite once, in the torch layout, and compute
their reference gradients without any framework.

Weights are lists of NumPy arrays in the canonical (torch ``named_parameters``) order:

- ``"softmax"``: ``[W (C, d), b (C,)]``, ``logits = x W^T + b``.
- ``"mlp"``: ``[W1 (H, d), b1 (H,), W2 (C, H), b2 (C,)]``, ``logits = tanh(x W1^T + b1) W2^T + b2``.
- ``"cnn"``: ``[K (F, 1, 3, 3), c (F,), W (C, F * 6 * 6), b (C,)]`` on inputs ``(n, 1, 8, 8)``:
  valid 3x3 convolution (cross-correlation, as torch), tanh, flatten (channel, row, column), linear.
- ``"lm"``: a causal transformer language model on dict batches ``{"input_ids" (n, T),
  "attention_mask" (n, T)}`` (the mask: 1 keep, 0 padding), with labels ``(n, T)`` (Hugging Face
  convention: -100 is not predicted; task ``"language_modeling"``). Weights, with vocabulary ``V``,
  positions ``T``, width ``D``, MLP width ``M`` (``LM_SIZES``):
  ``[E (V, D), P (T, D)]``, then per block ``[g1 (D,), h1 (D,), Wq (D, D), bq (D,), Wk, bk, Wv, bv,
  Wo (D, D), bo (D,), g2 (D,), h2 (D,), W1 (M, D), b1 (M,), W2 (D, M), b2 (D,)]``, then
  ``[g (D,), h (D,), Wout (V, D), bout (V,)]``. Each block is pre-LayerNorm (eps 1e-5):
  ``x += Wo attention(LN1(x)) + bo``, ``x += W2 gelu_tanh(W1 LN2(x) + b1) + b2``, where attention has
  ``LM_SIZES["heads"]`` heads, scores ``q k^T / sqrt(D / heads)`` set to the dtype's lowest value
  where the key is padding or in the future; logits ``Wout LN(x) + bout``.
"""
from __future__ import annotations

import numpy as np

from ..models import MLP, SoftmaxRegression
from ..errors import TrakValueError

KINDS = ("softmax", "mlp", "cnn", "lm")
SIZES = dict(d=8, hidden=6, classes=3, filters=2)
LM_SIZES = dict(vocab=20, length=6, width=8, heads=2, mlp=16, blocks=1)
IGNORE_INDEX = -100  # labels that are not predicted (Hugging Face)


def _lm_shapes() -> list[tuple[tuple[int, ...], str]]:
    """``(shape, role)`` of the LM's weights in canonical order; roles: embedding, gain, bias, matrix."""
    v, t, d, m = (LM_SIZES[key] for key in ("vocab", "length", "width", "mlp"))
    block = [((d,), "gain"), ((d,), "bias")]
    for _ in range(4):  # query, key, value, output projections
        block += [((d, d), "matrix"), ((d,), "bias")]
    block += [((d,), "gain"), ((d,), "bias"), ((m, d), "matrix"), ((m,), "bias"), ((d, m), "matrix"), ((d,), "bias")]
    return ([((v, d), "embedding"), ((t, d), "embedding")] + block * LM_SIZES["blocks"]
            + [((d,), "gain"), ((d,), "bias"), ((v, d), "matrix"), ((v,), "bias")])


def _lm_weights(rng: np.random.Generator, dtype: str) -> list[np.ndarray]:
    out = []
    for shape, role in _lm_shapes():
        if role == "gain":
            value = 1 + rng.normal(scale=0.2, size=shape)
        elif role == "matrix":
            value = rng.normal(scale=1.5 / np.sqrt(shape[1]), size=shape)
        else:
            value = rng.normal(scale=0.7 if role == "embedding" else 0.2, size=shape)
        out.append(value.astype(dtype))
    return out


def kronecker_layers(kind: str) -> tuple[list, list[tuple[str, int]]]:
    """The factorized layers and the rest of canonical model ``kind`` (``proj_type="kronecker"``), derived
    from the model definitions above, independently of any backend: weights are named ``"w<i>"`` by
    their canonical index. Returns ``(layers, [(name, size), ...])`` for ``trak_core.kronecker.make_plan``."""
    from ..kronecker import Layer

    shapes = [np.shape(w) for w in weights(kind, 0)]
    if kind == "lm":
        roles = [role for _, role in _lm_shapes()]
        matrices = [i for i, role in enumerate(roles) if role == "matrix"]
        looked_up, biased = [0], {i: i + 1 for i in matrices}  # the token table; each matrix's bias follows it
    else:  # softmax, mlp, cnn: weight, bias, weight, bias
        looked_up, biased = [], {i: i + 1 for i in range(0, len(shapes), 2)}
    layers = [Layer(f"w{i}", shapes[i][0], int(np.prod(shapes[i][1:])) + 1, f"w{i + 1}", "cols") for i in biased]
    layers += [Layer(f"w{i}", *shapes[i]) for i in looked_up]
    layers.sort(key=lambda layer: int(layer.name[1:]))
    taken = set(biased) | set(biased.values()) | set(looked_up)
    rest = [(f"w{i}", int(np.prod(shape))) for i, shape in enumerate(shapes) if i not in taken]
    return layers, rest


def weights(kind: str, seed: int, dtype: str = "float64") -> list[np.ndarray]:
    """Random canonical weights of model ``kind`` (scaled so margins vary across examples)."""
    rng = np.random.default_rng(seed)
    if kind == "lm":
        return _lm_weights(rng, dtype)
    d, h, c, f = SIZES["d"], SIZES["hidden"], SIZES["classes"], SIZES["filters"]
    shapes = {"softmax": [(c, d), (c,)], "mlp": [(h, d), (h,), (c, h), (c,)],
              "cnn": [(f, 1, 3, 3), (f,), (c, f * 36), (c,)]}[kind]
    return [rng.normal(scale=0.7, size=s).astype(dtype) for s in shapes]


def inputs(kind: str, n: int, seed: int, dtype: str = "float64") -> tuple[np.ndarray | dict, np.ndarray]:
    """Random inputs for ``kind`` and integer labels in ``[0, classes)``.

    For ``"lm"``: a dict batch ``{"input_ids", "attention_mask"}`` (int64; sequence ``i`` has
    ``T - i % 4`` tokens, padded at the end with token 0) and labels ``(n, T)``: the token ids, ``-100`` at the
    padding and, in every third sequence, at its second token (an unpredicted prompt). ``dtype`` is
    unused there (the inputs are integers).
    """
    rng = np.random.default_rng(seed)
    if kind == "lm":
        return lm_inputs(n, rng)
    shape = (n, 1, 8, 8) if kind == "cnn" else (n, SIZES["d"])
    return rng.normal(size=shape).astype(dtype), rng.integers(0, SIZES["classes"], n)


def flat(ws: list[np.ndarray]) -> np.ndarray:
    """The flat parameter vector in canonical order."""
    return np.concatenate([w.ravel() for w in ws])


def analytic_model(kind: str, weights: list[np.ndarray] | None = None) -> SoftmaxRegression | MLP:
    """The reference backend's model for ``kind`` (softmax and mlp only), sized like ``weights``."""
    d, h, c = SIZES["d"], SIZES["hidden"], SIZES["classes"]
    if weights is not None:
        d, h, c = weights[0].shape[1], weights[0].shape[0], weights[-1].shape[0]
    if kind == "softmax":
        return SoftmaxRegression(d, c)
    if kind == "mlp":
        return MLP(d, h, c)
    raise TrakValueError(f"the analytic reference has no {kind!r} model")


def cnn_logits(ws: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Forward pass of the canonical CNN in NumPy."""
    kernel, bias, weight, out_bias = ws
    n = x.shape[0]
    conv = np.zeros((n, kernel.shape[0], 6, 6))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("nhw,f->nfhw", x[:, 0, i:i + 6, j:j + 6], kernel[:, 0, i, j])
    hidden = np.tanh(conv + bias[None, :, None, None]).reshape(n, -1)
    return hidden @ weight.T + out_bias


def margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``logit_y - logsumexp_{j != y} logit_j`` per row."""
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    top = others.max(axis=1)
    return logits[rows, labels] - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def cnn_gradients(ws: list[np.ndarray], x: np.ndarray, y: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """Per-example margin gradients of the CNN by central finite differences (float64)."""
    return finite_difference_gradients("cnn", ws, x, y, step)


def lm_inputs(n: int, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """The ``"lm"`` dict batch and labels of ``inputs``: sequence ``i`` has ``T - i % 4`` tokens."""
    length = LM_SIZES["length"]
    ids = rng.integers(1, LM_SIZES["vocab"], (n, length))
    lengths = length - np.arange(n) % 4
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[::3, 1] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask}, labels


def _layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + 1e-5) * gain[..., None, None, :] + bias[..., None, None, :]


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.einsum("...ntd,...od->...nto", x, weight) + bias[..., None, None, :]


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def lm_logits(ws: list[np.ndarray], batch: dict) -> np.ndarray:
    """Forward pass of the canonical LM in NumPy: logits ``(n, T, V)``.

    Every weight may carry the same leading axes (several models at once, e.g. ``(P, *shape)``):
    the logits then have them too, ``(P, n, T, V)``.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n, length = ids.shape
    heads, width = LM_SIZES["heads"], ws[0].shape[-1]
    size = width // heads
    x = np.take(ws[0], ids, axis=-2) + ws[1][..., None, :length, :]
    lead = x.shape[:-3]
    keep = (mask[:, None, None, :] != 0) & np.tri(length, dtype=bool)  # (n, 1, T, T): key kept, not future
    lowest = np.finfo(x.dtype).min
    for b in range((len(ws) - 6) // 16):
        g1, h1, wq, bq, wk, bk, wv, bv, wo, bo, g2, h2, w1, b1, w2, b2 = ws[2 + 16 * b:2 + 16 * (b + 1)]
        a = _layer_norm(x, g1, h1)
        q, k, v = (np.swapaxes(_linear(a, w, c).reshape(*lead, n, length, heads, size), -2, -3)
                   for w, c in ((wq, bq), (wk, bk), (wv, bv)))
        scores = np.where(keep, q @ np.swapaxes(k, -1, -2) / np.sqrt(size), lowest)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attention = (scores / scores.sum(axis=-1, keepdims=True)) @ v
        x = x + _linear(np.swapaxes(attention, -2, -3).reshape(*lead, n, length, width), wo, bo)
        x = x + _linear(_gelu_tanh(_linear(_layer_norm(x, g2, h2), w1, b1)), w2, b2)
    return _linear(_layer_norm(x, ws[-4], ws[-3]), ws[-2], ws[-1])


def lm_output(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The summed per-token margins of each sequence (logits at ``t`` predict token ``t + 1``; -100 skipped).

    ``logits`` ``(..., n, T, V)`` -> ``(..., n)``.
    """
    *lead, n, length, vocab = logits.shape
    targets = np.broadcast_to(labels[:, 1:], (*lead, n, length - 1))
    counted = targets != IGNORE_INDEX
    margins = margin(logits[..., :-1, :].reshape(-1, vocab), np.where(counted, targets, 0).reshape(-1))
    return (margins.reshape(*lead, n, length - 1) * counted).sum(axis=-1)


def finite_difference_gradients(kind: str, ws: list[np.ndarray], x, y: np.ndarray,
                                step: float = 1e-6) -> np.ndarray:
    """Per-example gradients of the task output of ``kind`` by central finite differences (float64):
    ``"cnn"``: the margin; ``"lm"``: the summed per-token margins (64 parameters per vectorized pass)."""
    theta = flat(ws)
    shapes = [w.shape for w in ws]

    def unflatten(t: np.ndarray) -> list[np.ndarray]:  # t: (..., p) -> weights with the same leading axes
        out, start = [], 0
        for s in shapes:
            size = int(np.prod(s))
            out.append(t[..., start:start + size].reshape(*t.shape[:-1], *s))
            start += size
        return out

    def output(t: np.ndarray) -> np.ndarray:  # (P, p) -> (P, n)
        if kind == "lm":
            return lm_output(lm_logits(unflatten(t), x), y)
        return np.stack([margin(cnn_logits(unflatten(row), x), y) for row in t])

    grads = np.empty((len(y), theta.size))
    for start in range(0, theta.size, 64):
        columns = np.arange(start, min(theta.size, start + 64))
        shift = np.zeros((columns.size, theta.size))
        shift[np.arange(columns.size), columns] = step
        grads[:, columns] = ((output(theta + shift) - output(theta - shift)) / (2 * step)).T
    return grads
