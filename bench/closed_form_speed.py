"""Per-example gradients of the torch backend: the closed form (``per_example="auto"``) against ``vmap(grad)``.

One run, ratios within it: for ResNet-18 (convolutions, batch norms, a linear head), a ViT laid out as
torchvision's (``nn.MultiheadAttention``, a class token and position embeddings), a ConvNeXt laid out as
torchvision's (channels-first ``LayerNorm2d``, layer scales), Hugging Face's CLIP image classifier (its class
token ``(d,)`` expanded over the batch; the text tower is not called), a GPT-2 with
random weights (embeddings, Conv1D, layer norms), a Llama (its own RMSNorm class, grouped-query attention), a
Gemma (a scaled embedding tied to its head), an OPT (offset positions, flattened tokens), a BART
(``task="seq2seq"``: encoder and decoder, cross-attention, one token table looked up by both) and a Wav2Vec2 (a
weight-normed positional convolution; ``vmap`` cannot run its in-place masking, so that side is one example at a
time; the language and audio models need ``transformers``), examples per second of
``TorchBackend()`` and of ``TorchBackend(per_example="vmap")`` at its default chunk, alternated
``--repeats`` times (best of each), and their largest difference relative to the vmap gradients'
largest entry.

    python bench/closed_form_speed.py                 # ResNet-18, ViT, ConvNeXt, CLIP at 32 x 32; GPT-2 ... BART
    python bench/closed_form_speed.py --device cuda --batch 256
    python bench/closed_form_speed.py --only clip --only vit    # some of them
    python bench/closed_form_speed.py --only timm --timm efficientnet_b0 --timm convnext_atto  # timm's
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _convnext import ConvNeXt  # noqa: E402
from _report import require_cuda  # noqa: E402
from _resnet import resnet18  # noqa: E402
from _vit import VisionTransformer  # noqa: E402
from gpu_peers import phase  # noqa: E402

from trak_core.tasks import Classification, LanguageModeling, Seq2SeqLanguageModeling  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402


def models(small: bool, batch: int, device: str) -> dict[str, tuple[Any, Any, Any, Any, dict]]:
    """name -> (model, inputs, labels, task, backend options), float32, seeded, on ``device``."""
    torch.manual_seed(0)
    net = resnet18(10, 8 if small else 64).to(device).eval()
    for module in net.modules():  # trained-looking statistics, so the normalization is not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    out = {"resnet18" + ("-width8" if small else ""): (net, x, y, Classification(), {})}
    width, depth = (16, 2) if small else (192, 6)
    vit = VisionTransformer(width=width, depth=depth, heads=2 if small else 3).to(device).eval()
    out[f"vit-{depth}x{width}"] = (vit, x, y, Classification(), {})
    dims = (8, 16) if small else (48, 96, 192, 384)
    convnext = ConvNeXt(dims=dims, depths=(1,) * len(dims) if small else (2, 2, 4, 2), layer_scale=0.1)
    out[f"convnext-{'-'.join(map(str, dims))}"] = (convnext.to(device).eval(), x, y, Classification(), {})
    try:
        import transformers
    except ImportError:
        return out
    width, depth = (16, 2) if small else (192, 6)
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=width, intermediate_size=4 * width,
                                           num_hidden_layers=depth, num_attention_heads=2 if small else 3)
    config = transformers.CLIPConfig(vision_config=vision.to_dict(), text_config={"hidden_size": 16,
                                     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
                                     num_labels=10)
    clip = transformers.CLIPForImageClassification(config).to(device).eval()  # its class token (d,), expanded
    out[f"clip-vision-{depth}x{width}"] = (clip, {"pixel_values": x}, y, Classification(), {})
    width, layers, length = (32, 2, 16) if small else (256, 4, 64)
    config = transformers.GPT2Config(vocab_size=512, n_positions=length, n_embd=width, n_layer=layers, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
    gpt2 = transformers.GPT2LMHeadModel(config).to(device).eval()
    ids = torch.randint(0, 512, (batch, length), device=device)
    out[f"gpt2-{layers}x{width}"] = (gpt2, {"input_ids": ids}, ids, LanguageModeling(), {})
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=length, bos_token_id=0, eos_token_id=0)
    llama = transformers.LlamaForCausalLM(config).to(device).eval()
    out[f"llama-{layers}x{width}"] = (llama, {"input_ids": ids}, ids, LanguageModeling(), {})
    config = transformers.GemmaConfig(vocab_size=512, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=width // 4, max_position_embeddings=length, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0)
    gemma = transformers.GemmaForCausalLM(config).to(device).eval()  # scaled embedding, tied to the head
    out[f"gemma-{layers}x{width}"] = (gemma, {"input_ids": ids}, ids, LanguageModeling(), {})
    config = transformers.OPTConfig(vocab_size=512, hidden_size=width, ffn_dim=2 * width, num_hidden_layers=layers,
                                    num_attention_heads=4, max_position_embeddings=length, word_embed_proj_dim=width,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=1)
    opt = transformers.OPTForCausalLM(config).to(device).eval()  # offset positions from its 2-D mask
    batch_with_mask = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out[f"opt-{layers}x{width}"] = (opt, batch_with_mask, ids, LanguageModeling(), {"attention_mask": "pass"})
    config = transformers.BartConfig(vocab_size=512, d_model=width, encoder_layers=layers // 2 or 1,
                                     decoder_layers=layers // 2 or 1, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=2 * width, decoder_ffn_dim=2 * width,
                                     max_position_embeddings=length, pad_token_id=1, decoder_start_token_id=2)
    bart = transformers.BartForConditionalGeneration(config).to(device).eval()  # decoder inputs from the labels
    targets = torch.randint(3, 512, (batch, length // 2), device=device)
    out[f"bart-{layers}x{width}"] = (bart, batch_with_mask, targets, Seq2SeqLanguageModeling(), {})
    config = transformers.Wav2Vec2Config(hidden_size=width // 4, num_hidden_layers=layers, num_attention_heads=4,
                                         intermediate_size=width // 2, conv_dim=(32, 32, 32), conv_stride=(5, 2, 2),
                                         conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=4, num_labels=10, mask_time_prob=0.0)
    wav2vec2 = transformers.Wav2Vec2ForSequenceClassification(config).to(device).eval()  # weight-normed positions
    lengths = torch.randint(800, 1601, (batch,), device=device)
    mask = (torch.arange(1600, device=device)[None] < lengths[:, None]).long()  # vmap cannot run its masking: the
    sound = {"input_values": torch.randn(batch, 1600, device=device) * mask, "attention_mask": mask}  # loop
    out[f"wav2vec2-{layers}x{width // 4}"] = (wav2vec2, sound, y, Classification(), {})
    return out


def timm_model(name: str, batch: int, device: str) -> tuple[Any, Any, Any, Any, dict]:
    """A timm model (``BatchNormAct2d``, ``GroupNormAct``, layer scales reshaped channels-first), its norms'
    running statistics from two training-mode passes on random images."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, pretrained=False).to(device).train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32, device=device))
    x = torch.randn(batch, 3, 32, 32, device=device)
    return model.eval(), x, torch.randint(0, 10, (batch,), device=device), Classification(), {}


def measure(model: Any, inputs: Any, labels: Any, task: Any, options: dict, repeats: int, device: str) -> dict:
    """Examples per second of each path (best of ``repeats``, alternated) and their largest relative difference."""
    paths = {"closed form": TorchBackend(**options), "vmap": TorchBackend(per_example="vmap", **options)}
    prepared = {name: backend.prepare(model, None) for name, backend in paths.items()}
    grads = {name: backend.gradients(model, prepared[name], inputs, labels, task)[0]  # warm-up, and the check
             for name, backend in paths.items()}
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        for name, backend in paths.items():
            _, seconds, _ = phase(device, lambda: backend.gradients(model, prepared[name], inputs, labels, task))
            best[name] = min(best[name], seconds)
    n = labels.shape[0]
    used = prepared["closed form"].__dict__.get("_closed_form", {}).get(id(task)) is not None
    scale = float(grads["vmap"].abs().max())
    return dict(params=sum(t.numel() for t in model.parameters()), batch=n, closed_form_used=used,
                closed_form_examples_per_s=n / best["closed form"], vmap_examples_per_s=n / best["vmap"],
                speedup=best["vmap"] / best["closed form"],
                max_rel_difference=float((grads["closed form"] - grads["vmap"]).abs().max()) / scale)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="narrow models (a smoke run)")
    parser.add_argument("--only", action="append", help="the models whose name starts with this (repeatable)")
    parser.add_argument("--timm", action="append", metavar="NAME",
                        help="also a timm model, timm.create_model(NAME, num_classes=10) on 32 x 32 images "
                             "(repeatable; needs timm; random weights and trained-looking norm statistics)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    require_cuda(parser, args.device)
    cases = models(args.small, args.batch, args.device)
    for name in args.timm or ():
        cases[f"timm-{name}"] = timm_model(name, args.batch, args.device)
    unknown = [prefix for prefix in args.only or () if not any(name.startswith(prefix) for name in cases)]
    if unknown:
        parser.error(f"argument --only: no model's name starts with {unknown}; the models: {sorted(cases)}")
    result = {name: measure(*case, args.repeats, args.device) for name, case in cases.items()
              if not args.only or any(name.startswith(prefix) for prefix in args.only)}
    result["machine"] = dict(device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
                             load_average=os.getloadavg()[0])
    for name, row in result.items():
        if name != "machine":
            print(f"{name}: p={row['params']:,}, batch {row['batch']}: closed form "
                  f"{row['closed_form_examples_per_s']:.1f} ex/s, vmap {row['vmap_examples_per_s']:.1f} ex/s, "
                  f"{row['speedup']:.2f}x (used: {row['closed_form_used']}; max difference "
                  f"{row['max_rel_difference']:.1e})")
    print(result["machine"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
