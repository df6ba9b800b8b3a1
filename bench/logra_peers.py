"""trak-core's factorized projection (``proj_type=Kronecker(...)``) next to dattri 0.3.0's LoGra, on CPU:
examples/s and peak RSS of the gradient-projection step, on the same models and data, each run in its own process.

    python bench/logra_peers.py --json docs/bench/logra_peers.json   # MLP (5.3M params) and a GPT-2-small-shaped nanoGPT
    python bench/logra_peers.py --quick                              # small MLP and a tiny nanoGPT (seconds; dattri eager)
    python bench/logra_peers.py --only mlp

Peers
-----
dattri 0.3.0 ``dattri.algorithm.logra.LoGraAttributor`` (a thin wrapper of ``BlockProjectedIFAttributor``):
it monkey-patches the ``forward`` of every ``torch.nn.Linear`` (only ``nn.Linear``: Hugging Face GPT-2's
``Conv1D`` layers, embeddings and convolutions are not hooked) with a custom autograd function whose
backward projects the layer's input and output gradient with two Gaussian matrices of ``sqrt(proj_dim)``
columns each (``torch.Generator`` seeded ``1e4 * module_index`` and ``+1``, entries ``normal_()``, scaled
by ``1/sqrt(sqrt(proj_dim))``) and keeps their outer product: ``proj_dim`` features *per layer*. One
ordinary batched backward pass of the summed loss serves the whole batch (the outer product is multiplied
by the batch size to undo a mean). ``Compressor.forward`` is ``@torch.compile``d (Inductor on CPU; its
on-disk graph cache persists between runs, so the untimed warm-up is short after the first run).
LogIX (``logix-ai``, the LoGra authors' library) is not on the package index (``pip install logix-ai``:
no matching distribution), so it is not compared.

trak-core: ``TRAK(model, proj_type=Kronecker(dims={weight: proj_dim per layer}), proj_dim=total)`` with
the torch backend restricted to the ``nn.Linear`` weights and biases (``TorchBackend(params=...)``), so
both sketch exactly the same parameters with the same ``proj_dim`` per layer and the same total
(biases folded in as one more input column in both). Its factors are hash-derived +-1 matrices, not
dattri's Gaussian ones, and its per-layer split of ``proj_dim`` into ``k_rows x k_cols`` differs
(``ceil(sqrt(k sqrt(cols/rows)))`` columns, versus dattri's square ``sqrt(k) x sqrt(k)``): the two
libraries' features are different random sketches of the same gradients and cannot agree entry by
entry. Nor are the gradients the same function: dattri differentiates the loss (mean cross-entropy)
and trak-core TRAK's model output (the margin ``log p/(1-p)``, summed over tokens for a language
model), whose gradient is the loss gradient times ``-1/(1-p)`` for classification.

What is timed: the gradient-projection step. dattri: ``attributor.cache(train_loader)`` with
``hessian="Identity"`` (forward, backward with the projecting hooks, storing the projected gradients;
no preconditioner), after one untimed ``cache`` of one batch on the same attributor (Inductor's
compilation; the same batch size, as the compiled shapes depend on it). trak-core: ``trak.features(train)``
after an untimed ``featurize`` of one example (layer
discovery, the check against a dense gradient, and torch.func's first call): per-example gradients
of the layers' outputs under ``vmap`` and the projection. Peak RSS: ``ru_maxrss`` at the end of each
child process (``--child``), which runs one library on one model only; the peak after building the
model and one no-grad forward pass is reported with it.

Agreement (MLP only): for both libraries, the train x test inner products of their projected
gradients, with trak-core's features turned into loss gradients by the out-to-loss weights
(``g_loss = -(1 - p) grad margin``, so ``<g_i, g_j> ~ Q_i Q_j <phi_i, phi_j>``), against the exact
inner products of the per-example cross-entropy gradients (computed with ``torch.func``, no
projection): the Pearson correlation of each with the exact ones, of the two with each other, and the
relative error ``||S - S_exact|| / ||S_exact||``. Both are unbiased estimates of the exact products.

Models: ``mlp``: 3,072 -> 1,024 -> 1,024 -> 1,024 -> 10 (ReLU; 5,256,202 parameters, 4 Linear layers),
random CIFAR-sized inputs, 10 classes, 1,024 features per layer (32 x 32 for dattri), 4,096 in all.
``gpt``: dattri's own benchmark nanoGPT (``dattri.benchmark.models.nanoGPT.model.GPT``) at GPT-2-small
shape (12 layers, 12 heads, width 768, vocabulary 50,257, context 128; the head untied from the token
embedding so that both libraries see one use of each weight; explicit causal attention instead of
``scaled_dot_product_attention``, which has no ``vmap`` batching rule for its backward), on 128 random
tokens, next-token loss; 49 Linear layers, 81 features each (9 x 9 for dattri), 3,969 in all. A
Hugging Face GPT-2 is not used: its attention and MLP layers are ``Conv1D``, which dattri does not hook.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from _report import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
FULL = dict(mlp=dict(widths=[3072, 1024, 1024, 1024, 10], per_layer=1024, n_train=256, n_test=32, batch=32),
            gpt=dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=128, per_layer=81, n_train=8,
                     batch=4))
QUICK = dict(mlp=dict(widths=[64, 32, 32, 10], per_layer=64, n_train=32, n_test=8, batch=16),
             gpt=dict(n_layer=1, n_head=2, n_embd=32, vocab_size=128, block_size=16, per_layer=16, n_train=4,
                      batch=4))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- models and data ---------------------------------------------------------------------------------

def make_mlp(widths: list[int]):
    import torch

    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(*layers)

        def forward(self, inputs, labels=None):  # labels: dattri's setup calls model(**batch) on a dict batch
            return self.body(inputs)

    return MLP().eval()


def make_gpt(n_layer: int, n_head: int, n_embd: int, vocab_size: int, block_size: int):
    """dattri's nanoGPT with an untied head, explicit causal attention and full-sequence logits."""
    import torch
    from dattri.benchmark.models.nanoGPT.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       dropout=0.0, bias=True)
    gpt = GPT(config)
    gpt.transformer.wte.weight = torch.nn.Parameter(gpt.lm_head.weight.detach().clone())  # untie
    for block in gpt.transformer.h:
        block.attn.flash = False
        block.attn.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(
            1, 1, block_size, block_size))

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, inputs, labels=None):  # labels: dattri's setup calls model(**batch) on a dict batch
            input_ids = inputs
            t = self.gpt.transformer
            x = t.drop(t.wte(input_ids) + t.wpe(torch.arange(input_ids.shape[-1], device=input_ids.device)))
            for block in t.h:
                x = block(x)
            return self.gpt.lm_head(t.ln_f(x))

    return LM().eval()


def make_model(name: str, settings: dict):
    if name == "mlp":
        return make_mlp(settings["widths"])
    return make_gpt(**{key: settings[key] for key in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")})


def make_data(name: str, settings: dict, n: int, seed: int):
    """``(inputs, labels)`` tensors: random images and classes, or random tokens (labels = the tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(n, settings["widths"][0], generator=g), torch.randint(0, 10, (n,), generator=g)
    ids = torch.randint(0, settings["vocab_size"], (n, settings["block_size"]), generator=g)
    return ids, ids.clone()


def linear_params(model) -> list[str]:
    """Names of the weights and biases of the model's ``nn.Linear`` layers."""
    import torch

    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names += [f"{module_name}.{p}" for p, _ in module.named_parameters()]
    return names


def loss_sum(name: str, logits, labels):
    """Per-example losses: cross-entropy (mlp), mean next-token cross-entropy (gpt)."""
    import torch

    if name == "mlp":
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    v = logits.shape[-1]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                                                  reduction="none")
    return per_token.reshape(labels.shape[0], -1).mean(dim=1)


# --- the two libraries (child processes) -------------------------------------------------------------

def run_trak_core(name: str, settings: dict, model, train, test, want_products: bool) -> dict:
    import torch

    import trak_core
    from trak_torch import TorchBackend

    params = linear_params(model)
    layers = [n for n in params if n.endswith(".weight")]
    per_layer = settings["per_layer"]
    kind = trak_core.Kronecker(dims={n: per_layer for n in layers})
    task = "classification" if name == "mlp" else "language_modeling"
    trak = trak_core.TRAK(model, task=task, proj_dim=per_layer * len(layers), proj_type=kind, lambda_reg=1e-3,
                          backend=TorchBackend(params=params), progress=False)
    x, y = train
    batch = settings["batch"]
    start = time.perf_counter()
    trak.featurize(model.state_dict(), [(x[:1], y[:1])])  # warm-up: discovery, check, first call
    warm = time.perf_counter() - start
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]
    start = time.perf_counter()
    features = trak.features(batches)
    seconds = time.perf_counter() - start
    row = dict(warm_up_seconds=warm, seconds=seconds, proj_dim=int(features.shape[1]), layers=len(layers))
    if want_products:
        with torch.no_grad():  # out-to-loss weights Q = 1 - p_y: g_loss = -Q grad(margin)
            q_train = 1 - torch.softmax(model(x), -1).gather(1, y[:, None])[:, 0]
            q_test = 1 - torch.softmax(model(test[0]), -1).gather(1, test[1][:, None])[:, 0]
        phi_test = trak.features([test])
        row["products"] = ((q_train[:, None] * features) @ (q_test[:, None] * phi_test).T).tolist()
    return row


def run_dattri(name: str, settings: dict, model, train, test, want_products: bool) -> dict:
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    def loss_func(model, batch, device):  # dattri's BlockProjectedIF calls loss_func(model, batch, device)
        return loss_sum(name, model(batch["inputs"].to(device)), batch["labels"].to(device)).mean()

    def loader(x, y):  # dict batches: dattri 0.3.0 indexes a tuple batch's inputs twice when it sets up
        return DataLoader([{"inputs": a, "labels": b} for a, b in zip(x, y)], batch_size=batch, shuffle=False)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    x, y = train
    batch = settings["batch"]
    with tempfile.TemporaryDirectory() as cache_dir:
        attributor = LoGraAttributor(task, hessian="Identity", device="cpu", proj_dim=settings["per_layer"],
                                     offload="cpu", cache_dir=cache_dir)
        start = time.perf_counter()  # warm-up: Inductor compiles Compressor.forward (once per layer shape)
        attributor.cache(loader(x[:batch], y[:batch]))
        warm = time.perf_counter() - start
        train_loader = loader(x, y)
        start = time.perf_counter()
        attributor.cache(train_loader)
        seconds = time.perf_counter() - start
        row = dict(warm_up_seconds=warm, seconds=seconds, proj_dim=int(attributor.total_proj_dim),
                   layers=len(attributor.layer_names))
        if want_products:
            # test batches as (x, y) tuples: dattri differentiates mean cross-entropy of model(x) itself
            scores = attributor.attribute(train_loader, DataLoader(TensorDataset(*test), batch_size=len(test[1]),
                                                                   shuffle=False))
            row["products"] = scores.tolist()
    return row


def exact_products(name: str, model, train, test) -> list:
    """``<g_i, g_j>`` of per-example loss gradients (all parameters of the Linear layers), no projection."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return loss_sum(name, functional_call(model, p, (x[None],)), y[None])[0]

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))

    def flat(x, y):
        g = per_example(params, x, y)
        return torch.cat([g[k].reshape(len(y), -1) for k in params], dim=1)

    g_test = flat(*test)
    out = [flat(train[0][i:i + 32], train[1][i:i + 32]) @ g_test.T for i in range(0, len(train[1]), 32)]
    return torch.cat(out).tolist()


def child(spec: dict) -> dict:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    name, library, settings = spec["model"], spec["library"], spec["settings"]
    model = make_model(name, settings)
    train = make_data(name, settings, settings["n_train"], seed=1)
    test = make_data(name, settings, settings.get("n_test", 1), seed=2)
    with torch.no_grad():
        model(train[0][:settings["batch"]])
    model_rss = peak_rss_mib()
    if library == "exact":
        return dict(products=exact_products(name, model, train, test))
    want = spec["products"]
    row = (run_trak_core if library == "trak_core" else run_dattri)(name, settings, model, train, test, want)
    row.update(model=name, library=library, params=sum(t.numel() for t in model.parameters()),
               examples=settings["n_train"], batch=settings["batch"], proj_dim_per_layer=settings["per_layer"],
               threads=torch.get_num_threads(), examples_per_s=settings["n_train"] / row["seconds"],
               model_rss_mib=model_rss, peak_rss_mib=peak_rss_mib())
    return row


# --- parent -------------------------------------------------------------------------------------------

def run_child(spec: dict, env: dict | None = None) -> dict:
    before = load()
    with tempfile.TemporaryDirectory() as cwd:  # whatever a library writes next to itself stays out of the repo
        proc = subprocess.run([sys.executable, os.path.join(HERE, "logra_peers.py"), "--child", json.dumps(spec)],
                              capture_output=True, text=True, cwd=cwd, env=env, check=False)
    if proc.returncode != 0:
        return dict(model=spec["model"], library=spec["library"], error=(proc.stderr or proc.stdout)[-4000:],
                    load_before=before, load_after=load())
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(load_before=before, load_after=load())
    return row


def _pearson(a, b) -> float:
    import numpy as np

    a, b = np.ravel(a), np.ravel(b)
    return float(np.corrcoef(a, b)[0, 1])


def _relative_error(a, exact) -> float:
    import numpy as np

    return float(np.linalg.norm(np.subtract(a, exact)) / np.linalg.norm(exact))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small MLP and a tiny nanoGPT (seconds)")
    parser.add_argument("--only", choices=["mlp", "gpt"], action="append", help="these models only")
    parser.add_argument("--threads", type=int, help="torch threads in the children (default: torch's)")
    parser.add_argument("--no-compile", action="store_true",
                        help="run dattri with TORCHDYNAMO_DISABLE=1 (its torch.compile off; eager; --quick does)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return {}
    import importlib.metadata

    settings = QUICK if args.quick else FULL
    models = [name for name in ("mlp", "gpt") if not args.only or name in args.only]
    compile_dattri = not (args.no_compile or args.quick)  # --quick: no Inductor compilation (tens of seconds)
    env = None if compile_dattri else dict(os.environ, TORCHDYNAMO_DISABLE="1")
    versions = {name: importlib.metadata.version(name) for name in ("torch", "dattri")}
    result = dict(mode="quick" if args.quick else "full", date=time.strftime("%Y-%m-%d %H:%M %Z"),
                  cores=os.cpu_count(), load_before=load(), versions=versions,
                  command=" ".join(["python", "bench/logra_peers.py"] + (argv if argv is not None else sys.argv[1:])),
                  dattri_compile=compile_dattri,
                  logix="not compared: logix-ai is not on the package index (pip: no matching distribution)",
                  matrices="different: dattri draws Gaussian factors from torch.Generator, trak-core hash-derived "
                           "+-1 factors with another k_rows x k_cols split; features cannot agree entry by entry",
                  rows=[], summary=[])
    print(f"load average before: {result['load_before']} ({os.cpu_count()} cores)", flush=True)
    for name in models:
        products = name == "mlp"
        rows = {}
        for library in ("trak_core", "dattri"):
            row = run_child(dict(model=name, library=library, settings=settings[name], threads=args.threads,
                                 products=products), env=env if library == "dattri" else None)
            rows[library] = row
            shown = {key: value for key, value in row.items() if key != "products"}
            result["rows"].append(shown)
            print(json.dumps(shown), flush=True)
            write_json(result, args.json)
        if any("error" in row for row in rows.values()):
            continue
        ours, theirs = rows["trak_core"], rows["dattri"]
        summary = dict(model=name, params=ours["params"], trak_core_examples_per_s=ours["examples_per_s"],
                       dattri_examples_per_s=theirs["examples_per_s"],
                       ratio=ours["examples_per_s"] / theirs["examples_per_s"],
                       trak_core_peak_rss_mib=ours["peak_rss_mib"], dattri_peak_rss_mib=theirs["peak_rss_mib"],
                       trak_core_proj_dim=ours["proj_dim"], dattri_proj_dim=theirs["proj_dim"])
        if products:
            exact = run_child(dict(model=name, library="exact", settings=settings[name], threads=args.threads))
            if "error" in exact:
                summary["agreement_error"] = exact["error"]
            else:
                s_ours, s_theirs, s_exact = ours["products"], theirs["products"], exact["products"]
                summary["agreement"] = dict(
                    pearson_trak_core_exact=_pearson(s_ours, s_exact), pearson_dattri_exact=_pearson(s_theirs, s_exact),
                    pearson_trak_core_dattri=_pearson(s_ours, s_theirs),
                    rel_error_trak_core=_relative_error(s_ours, s_exact),
                    rel_error_dattri=_relative_error(s_theirs, s_exact),
                    n_train=len(s_exact), n_test=len(s_exact[0]))
        result["summary"].append(summary)
        print(json.dumps(summary), flush=True)
        write_json(result, args.json)
    result["load_after"] = load()
    print(f"\n{'model':<5} {'library':<10} {'params':>11} {'k':>5} {'n':>4} {'ex/s':>9} {'model RSS':>10} {'peak RSS':>10}")
    for row in result["rows"]:
        if "error" in row:
            print(f"{row['model']:<5} {row['library']:<10} FAILED: {row['error'].strip().splitlines()[-1]}")
            continue
        print(f"{row['model']:<5} {row['library']:<10} {row['params']:>11,} {row['proj_dim']:>5} {row['examples']:>4} "
              f"{row['examples_per_s']:>9.4g} {row['model_rss_mib']:>8.0f} M {row['peak_rss_mib']:>8.0f} M")
    for s in result["summary"]:
        print(f"{s['model']}: trak-core / dattri LoGra = {s['ratio']:.2f}x examples/s")
        if "agreement" in s:
            a = s["agreement"]
            print(f"  inner products vs exact: Pearson trak-core {a['pearson_trak_core_exact']:.4f}, "
                  f"dattri {a['pearson_dattri_exact']:.4f}, trak-core vs dattri {a['pearson_trak_core_dattri']:.4f}")
    print(f"LogIX: {result['logix']}. Projection matrices: {result['matrices']}.")
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
