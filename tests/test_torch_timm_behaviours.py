"""What timm's models do that the torch backend meets, in small models written here in timm's layout (timm is not
needed): gradient checkpointing on its own flag (``grad_checkpointing``, checked in eval mode too), and a position
table resampled for another image size (``dynamic_img_size``: a later batch the closed form cannot follow). Per-example
gradients against the model's own backward pass one example at a time (float64)."""
import logging
import warnings

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")

from test_closed_form_functional import _one_at_a_time  # noqa: E402

from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

nn = torch.nn
F = torch.nn.functional


class Checkpointed(nn.Module):
    """Two blocks run through ``torch.utils.checkpoint`` while ``grad_checkpointing`` is set, in any mode (timm's
    ``checkpoint_seq`` pattern)."""

    def __init__(self):
        super().__init__()
        self.grad_checkpointing = True
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for block in self.blocks:
            if self.grad_checkpointing:
                x = torch.utils.checkpoint.checkpoint(lambda t, b=block: torch.tanh(b(t)), x, use_reentrant=False)
            else:
                x = torch.tanh(block(x))
        return self.head(x)


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
def test_timm_gradient_checkpointing_is_off_while_gradients_are_taken(per_example, caplog):
    """Before, vmap could not run the checkpoint and the closed form's hooks ran again in its recomputation: both
    went to one example at a time, with a warning. Now the flag is off for the duration (and on again after)."""
    caplog.set_level(logging.INFO, logger="trak_core")
    torch.manual_seed(0)
    model = Checkpointed().double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    task = get_task("classification")
    backend = TorchBackend(per_example=per_example)
    prepared = backend.prepare(model, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "vmap cannot take this model's per-example gradients"
        grads, _ = backend.gradients(model, prepared, x, y, task)
    model.grad_checkpointing = False
    reference = _one_at_a_time(model, x, y, task)
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-12
    assert "_looped" not in prepared.__dict__
    if per_example == "auto":
        assert prepared._closed_form[id(task)] is not None, caplog.text
    model.grad_checkpointing = True
    backend.gradients(model, prepared, x, y, task)
    assert model.grad_checkpointing is True


class Resampled(nn.Module):
    """Patches of 2 x 2 pixels plus a position table ``(1, H * W, d)`` for 4 x 4 images, resampled bilinearly for
    other sizes through a reshape that assumes its leading 1 (timm's ``resample_abs_pos_embed``)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 4, 2, stride=2)
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, 4, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.patch(x)
        size = h.shape[-2:]
        pos = self.pos_embed
        if tuple(size) != (2, 2):
            grid = pos.reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
            pos = F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])
        tokens = h.flatten(2).transpose(1, 2) + pos
        return self.head(torch.tanh(tokens).mean(1))


def test_a_later_batch_the_closed_form_cannot_follow_goes_to_vmap(caplog):
    """The first batch (4 x 4 images) takes the closed form, the position table given as per-example copies; a
    later batch of 6 x 8 images makes the model resample it through ``reshape(1, ...)``, which the copies cannot
    take: that raised out of ``featurize``; now that batch and the later ones take vmap."""
    caplog.set_level(logging.INFO, logger="trak_core")
    torch.manual_seed(0)
    model = Resampled().double().eval()
    g = torch.Generator().manual_seed(2)
    first = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    later = torch.randn(3, 3, 6, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    task = get_task("classification")
    backend = TorchBackend()
    prepared = backend.prepare(model, None)
    for x in (first, later, first):
        grads, _ = backend.gradients(model, prepared, x, y, task)
        reference = _one_at_a_time(model, x, y, task)
        assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-12
    assert prepared._closed_form[id(task)] is None
    assert "through vmap from this batch on" in caplog.text
