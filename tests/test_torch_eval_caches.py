"""LeViT's attention layers keep ``attention_biases[:, idxs]`` in ``attention_bias_cache`` in eval mode (timm's
LeViT, TinyViT and EfficientFormer do the same). trak-core's first forward (no gradient) filled it: the biases'
gradients were 0 in every path, and a later checkpoint ran with the first one's biases. The reference is batched
autograd on a model whose cache is cleared (``train()`` then ``eval()``), which in eval mode is each example's own
gradient."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: LeViT not exercised")

import trak_core  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

from tests_helpers import batched_margin_gradients  # noqa: E402


def _levit(seed):
    torch.manual_seed(seed)
    config = transformers.LevitConfig(image_size=32, patch_size=16, hidden_sizes=[16, 24, 32],
                                      num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
                                      down_ops=[["Subsample", 8, 2, 4, 2, 2], ["Subsample", 8, 3, 4, 2, 2]],
                                      num_labels=3)
    model = transformers.LevitForImageClassification(config).double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("attention_biases"):
                parameter.normal_()  # zeros at initialization: checkpoints that differ in them
    return model.eval()


def _reference(model, x, y):
    model.train()
    model.eval()  # LeViT clears its cache in train()
    return batched_margin_gradients(model(pixel_values=x).logits, y, list(model.parameters()))


@pytest.mark.parametrize("per_example", ["auto", "vmap", "loop"])
def test_levit_attention_biases_are_attributed_for_every_checkpoint(per_example):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    model = _levit(0)
    with torch.no_grad():
        model(pixel_values=x)  # the user's own eval forward fills the cache with checkpoint 0's biases
    trak = trak_core.TRAK(model, proj_dim=None, lambda_reg=1.0, progress=False,
                          backend=TorchBackend(per_example=per_example))
    for c, seed in enumerate((0, 5)):
        checkpoint = _levit(seed).state_dict()
        trak.featurize(checkpoint, [(x, y)])
        other = _levit(seed)
        reference = _reference(other, x, y)
        features = trak.store[c].features
        assert float((features - reference).norm() / reference.norm()) < 1e-10, c
