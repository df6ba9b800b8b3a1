"""Shared by several test files: backends that misbehave on purpose, model outputs in every structure, and a
save_as interrupted mid-write, the store tests' data."""
import numpy as np

from trak_core.backends import numpy_backend

STORE_ROWS = 300  # the training rows of the store tests' data (test_store_metadata_damage, test_store_urls)


def store_data():
    """The store tests' training data: ``STORE_ROWS`` rows of 5 features, labels of 3 classes."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(STORE_ROWS, 5)), rng.integers(0, 3, STORE_ROWS)


def store_targets(rows=slice(0, 6)):
    """One target batch: ``rows`` of the store tests' training data."""
    x, y = store_data()
    return [(x[rows], y[rows])]


class ZeroGradients(numpy_backend.ArrayAPIBackend):
    """Gradients that vanish everywhere (a dead network)."""

    def gradients(self, model, prepared, inputs, labels, task):
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        return grads * 0.0, q


class ModelOutput(dict):
    """Hugging Face's ``ModelOutput`` in miniature: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        return self[name]


class WithLogits:
    """An object whose ``.logits`` attribute holds the logits."""

    def __init__(self, logits, hidden):
        self.logits, self.hidden = logits, hidden


# (how a model packs its logits ``out``, the logits_fn that unpacks it or None for the default rule, id)
STRUCTURED_OUTPUTS = [
    (lambda out: (out, out.sum(1)), None, "tuple"),
    (lambda out: [out, out * 2], None, "list"),
    (lambda out: {"hidden": out * 2, "logits": out}, None, "dict"),
    (lambda out: ModelOutput(loss=out.sum(), logits=out), None, "model-output"),
    (lambda out: WithLogits(out, out * 2), None, "object"),
    (lambda out: {"scores": out, "hidden": out * 2}, lambda output: output["scores"], "logits-fn-dict"),
    (lambda out: (out * 2, out), lambda output: output[1], "logits-fn-second"),
]


def batched_margin_gradients(logits, labels, params):
    """Each example's classification-margin gradient (``logit_y - logsumexp(other logits)``) from one batched forward's
    ``logits``: in eval mode examples do not interact, and a batch of two or more avoids PyTorch's CPU BatchNorm
    backward on one example (``trak_torch.looped.batch_norm_layout``)."""
    import torch

    rows = []
    for i in range(logits.shape[0]):
        y = int(labels[i])
        margin = logits[i, y] - torch.logsumexp(torch.cat([logits[i, :y], logits[i, y + 1:]]), 0)
        grads = torch.autograd.grad(margin, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def save_interrupted(monkeypatch, trak, targets, name, error=KeyboardInterrupt):
    """``trak.score(targets, save_as=name)`` interrupted (``error`` raised) at the first chunk of the set: the set
    is created, no data or checksum written, as a kill mid-save leaves it."""
    import pytest
    import zarr

    original = zarr.Array.__setitem__

    def killed(self, key, value):
        if self.path.startswith("scores/"):
            raise error
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", killed)
    with pytest.raises(error):
        trak.score(targets, save_as=name)
    monkeypatch.setattr(zarr.Array, "__setitem__", original)


def load_bench(name: str, prefix: str = "bench"):
    """Import ``bench/<name>.py`` as a module named ``<prefix>_<name>``, with ``bench/`` and ``bench/quality/`` on
    the path while it loads (the scripts import their siblings)."""
    import importlib.util
    import pathlib
    import sys

    bench = pathlib.Path(__file__).resolve().parents[1] / "bench"
    paths = [str(bench), str(bench / "quality")]
    sys.path[:0] = paths
    try:
        spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", bench / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        for path in paths:
            sys.path.remove(path)
