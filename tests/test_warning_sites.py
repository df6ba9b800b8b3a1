"""Every warning trak-core issues names the user's line, on every call path, and a per-batch check says it once.

A fixed ``stacklevel`` was right from one path only: the same kernel checks run under ``featurize``, ``refit`` and
the first ``score`` of a store reopened with ``TRAK.open``, and pointed into ``trak_core/_fitting.py`` (or at
``sys:1``) from the others; the model-output check ran per batch and per gradient path (24 warnings for two
checkpoints of three batches, shown four times under Python's default filter, from four library lines).
The expectations here are the file and source line of each call in this test (``linecache``), and counts of calls.
"""
from __future__ import annotations

import ast
import linecache
import os
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import trak_core

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve()


def _at_user_line(record: warnings.WarningMessage, call: str) -> bool:
    """The warning names this file, at a line that makes the call ``call`` (e.g. ``"refit("``)."""
    return pathlib.Path(record.filename).resolve() == HERE and call in linecache.getline(record.filename, record.lineno)


def _rank_deficient(got: list) -> list:
    return [w for w in got if "rank-deficient" in str(w.message)]


def test_a_kernel_warning_names_the_users_line_on_every_path(tmp_path):
    """lambda_reg=0 on duplicated examples: the Gram matrix is rank-deficient, said from featurize, refit, and the
    first score and self_influence of a reopened store; each at the line of that call, not in trak_core."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("zarr")
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    x[20:] = x[:20]
    y = torch.randint(0, 3, (40,))
    y[20:] = y[:20]
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    store = tmp_path / "store"
    trak = trak_core.TRAK(model, proj_dim=128, lambda_reg=0, store=store, progress=False)
    seen = {}
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        trak.featurize(model.state_dict(), [(x, y)])
        seen["featurize("] = _rank_deficient(got)
        del got[:]
        trak.refit(1.0)
        trak.refit(0)
        seen["refit("] = _rank_deficient(got)
        del got[:]
        opened = trak_core.TRAK.open(store, model, [model.state_dict()], progress=False)
        opened.score([(x[:3], y[:3])])
        seen["score("] = _rank_deficient(got)
        del got[:]
        again = trak_core.TRAK.open(store, model, [model.state_dict()], progress=False)
        again.self_influence()
        seen["self_influence("] = _rank_deficient(got)
    for call, records in seen.items():
        assert len(records) == 1, (call, [str(w.message) for w in records])
        record = records[0]
        assert record.category is RuntimeWarning
        assert _at_user_line(record, call), (call, record.filename, record.lineno)


def test_jax_float32_kernel_warnings_name_the_users_line_on_refit_and_reopen(tmp_path):
    """JAX without x64 cannot remake an ill-conditioned float32 kernel in float64 and says so per checkpoint: from
    featurize, refit and a reopened store's first score, at each call's line (was: sys:1 and trak_core/trak.py)."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("zarr")
    import jax.numpy as jnp
    from trak_jax import JaxModel

    if jax.config.jax_enable_x64:
        pytest.skip("needs JAX without x64 (float32 kernels)")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(60, 8)), dtype=jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 60))

    def apply(params, inputs):
        (w1, b1), (w2, b2) = params
        return jnp.tanh(inputs @ w1.T + b1) @ w2.T + b2

    checkpoints = [[(jnp.asarray(rng.normal(size=(16, 8)) / 3, jnp.float32), jnp.zeros(16, jnp.float32)),
                    (jnp.asarray(rng.normal(size=(3, 16)) / 4, jnp.float32), jnp.zeros(3, jnp.float32))]
                   for _ in range(2)]
    store = tmp_path / "store"
    trak = trak_core.TRAK(JaxModel(apply), proj_dim=64, lambda_reg=1e-4, store=store, progress=False)
    seen = {}
    ill = "ill-conditioned"
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for params in checkpoints:
            trak.featurize(params, [(x, y)])
        seen["featurize("] = [w for w in got if ill in str(w.message)]
        del got[:]
        trak.refit(1e-5)
        seen["refit("] = [w for w in got if ill in str(w.message)]
        del got[:]
        opened = trak_core.TRAK.open(store, JaxModel(apply), checkpoints, progress=False)
        opened.score([(x[:4], y[:4])])
        seen["score("] = [w for w in got if ill in str(w.message)]
    for call, records in seen.items():
        assert [str(w.message).split(":")[0] for w in records] == ["checkpoint 0", "checkpoint 1"], call
        for record in records:
            assert record.category is RuntimeWarning
            assert _at_user_line(record, call), (call, record.filename, record.lineno)


def _features_too():
    """A torch model returning (logits, hidden): both batch-shaped, so the rule (the first is the logits) is said."""
    import torch

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

        def forward(self, inputs):
            h = torch.tanh(self.a(inputs))
            return self.b(h), h

    return Pair()


@pytest.mark.parametrize("proj_type", ["rademacher", "kronecker"])
def test_the_model_output_warning_is_said_once_per_call_at_the_users_line(proj_type):
    """Two checkpoints of three batches, then a score: three warnings under "always" (one per call), and two
    under Python's default filter (one per line of this test that calls); was 24 to 30, and 4 from library lines."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 60, 20)]
    model = _features_too()
    for action, expected in (("always", 3), ("default", 2)):
        trak = trak_core.TRAK(model, proj_dim=32, proj_type=proj_type, progress=False)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter(action)
            for seed in range(2):
                trak.featurize({k: v + 0.01 * seed for k, v in model.state_dict().items()}, batches)
            trak.score(batches[:1])
        said = [w for w in got if "several batch-shaped tensors" in str(w.message)]
        assert len(said) == expected, (action, [(w.filename, w.lineno) for w in said])
        assert all(w.category is UserWarning and "logits_fn" in str(w.message) for w in said)
        assert sum(_at_user_line(w, "featurize(") for w in said) == expected - 1
        assert sum(_at_user_line(w, "score(") for w in said) == 1


def test_a_backend_fallback_warning_names_the_featurize_line():
    """proj_type='kronecker' on a model torch.func.vmap cannot run (data-dependent control flow): the fallback to one
    example at a time is said at the featurize call (was: inside trak_torch)."""
    torch = pytest.importorskip("torch")

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

        def forward(self, inputs):
            h = torch.tanh(self.a(inputs))
            if float(h.abs().sum()) >= 0:  # always; but vmap cannot take float() of a batched tensor
                h = h - h.mean(0, keepdim=True)  # and the examples interact: the batched pass is not taken
            return self.b(h)

    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = Branchy()
    trak = trak_core.TRAK(model, proj_dim=32, proj_type="kronecker", progress=False)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        trak.featurize(model.state_dict(), [(x[:20], y[:20]), (x[20:], y[20:])])
    said = [w for w in got if "vmap cannot run this model" in str(w.message)]
    assert len(said) == 1 and said[0].category is RuntimeWarning
    assert _at_user_line(said[0], "featurize("), (said[0].filename, said[0].lineno)


def test_lds_warning_names_the_users_line():
    scores = np.zeros((6, 2))
    scores[:, 0] = np.arange(6.0)
    masks = np.random.default_rng(0).random((5, 6)) < 0.5
    outputs = np.random.default_rng(1).normal(size=(5, 2))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        result = trak_core.lds(scores, masks, outputs)
    assert result.undefined == [1]
    assert len(got) == 1 and got[0].category is RuntimeWarning
    assert _at_user_line(got[0], "lds(")


def test_warn_outside_a_call_names_the_caller_and_repeats():
    """Called from outside trak-core (no library frame), ``warn`` names its caller; ``once`` only acts inside a
    decorated call."""
    from trak_core import notices

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(2):
            notices.warn("outside", RuntimeWarning, once=True)
    assert len(got) == 2 and all(_at_user_line(w, "notices.warn(") for w in got)


def test_a_warning_in_a_thread_started_on_score_names_trak_cores_line_not_threading(monkeypatch):
    """``Thread(target=trak.score)`` and ``ThreadPoolExecutor.submit(trak.score, ...)``: no user line is on the
    thread's stack, and the warning named threading.py:982 and concurrent/futures/thread.py:58 (the lines that call a
    thread's target). It names trak-core's line that warns; a user function as the target is still named."""
    import concurrent.futures
    import threading

    from trak_core import _progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # progress=True without tqdm: score warns (numpy only)
    monkeypatch.setitem(sys.modules, "tqdm.std", None)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    model = trak_core.MLP(5, 4, 3)
    trak = trak_core.TRAK(model, proj_dim=8, progress=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trak.featurize(model.init(seed=0), [(x, y)])
    targets = [(x[:2], y[:2])]

    def started(how):
        monkeypatch.setattr(_progress, "_said_no_tqdm", [])
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            if how == "pool":
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    pool.submit(trak.score, targets).result()
            else:
                target = trak.score if how == "thread" else lambda: trak.score(targets)
                thread = threading.Thread(target=target, args=(targets,) if how == "thread" else ())
                thread.start()
                thread.join()
        assert len(got) == 1 and "tqdm" in str(got[0].message), [str(w.message) for w in got]
        return got[0]

    for how in ("thread", "pool"):
        said = started(how)
        assert pathlib.Path(said.filename).resolve() == ROOT / "trak_core" / "_progress.py", (how, said.filename)
        assert "warn(" in linecache.getline(said.filename, said.lineno)
    assert _at_user_line(started("lambda"), "trak.score(targets)")


def test_no_module_calls_warnings_warn_directly():
    """Each warning goes through ``trak_core.notices.warn``: a fixed stacklevel is right from one call path only."""
    files = sorted((ROOT / "trak_core").rglob("*.py")) + sorted((ROOT / "backends").rglob("*.py"))
    found = []
    for path in files:
        if path == ROOT / "trak_core" / "notices.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "warnings"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, "use trak_core.notices.warn:\n" + "\n".join(found)


_BARS_AND_MESSAGES = r'''
import torch, trak_core
torch.manual_seed(0)
x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 200, 20)]

class Pair(torch.nn.Module):  # a warning: (logits, hidden), both batch-shaped
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
    def forward(self, inputs):
        h = torch.tanh(self.a(inputs))
        return self.b(h), h

class Mixing(Pair):  # a log record (WARNING, no logging configured): its examples interact through a batch mean
    def forward(self, inputs):
        h = torch.tanh(self.a(inputs))
        return self.b(h - h.mean(0, keepdim=True))

for cls in (Pair, Mixing):
    model = cls()
    trak_core.TRAK(model, proj_dim=32, progress=True).featurize(model.state_dict(), batches)
'''


def test_messages_do_not_land_on_a_progress_bars_line(tmp_path):
    """With bars drawn, trak-core's warning and its logger's record each start a line of their own; before, both
    were appended to the bar's line ("... 0/10 [00:00<?, ?it/s]trak-core: the model's outputs ...")."""
    pytest.importorskip("torch")
    pytest.importorskip("tqdm")
    script = tmp_path / "bars.py"
    script.write_text(_BARS_AND_MESSAGES)
    env = {**os.environ, "PYTHONWARNINGS": "always", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'backends'}"}
    err = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300, check=True).stderr  # text: each \r is a line end too, as on a terminal
    lines = re.split(r"[\r\n]", err)  # what a terminal shows: each line, as far as a \r starts it again
    said = {"UserWarning: the model returns a tuple": 0, "trak-core: the model's outputs for two examples": 0}
    for line in lines:
        for text in said:
            if text in line:
                said[text] += 1
                assert "it/s]" not in line and "featurize checkpoint" not in line, line[:200]
    assert all(count >= 1 for count in said.values()), said
    assert "featurize checkpoint 0" in err  # the bars were drawn
