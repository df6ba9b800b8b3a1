"""Where progress bars are shown: progress=None in a Jupyter kernel (stderr is no terminal there), and
progress=True without tqdm."""
import sys
import types
import warnings

import numpy as np
import pytest

tqdm_std = pytest.importorskip("tqdm.std", reason="tqdm is not installed: progress bars are not exercised")

from trak_core import _progress  # noqa: E402


@pytest.fixture
def notebook(monkeypatch):
    """A Jupyter kernel as IPython exposes one: ``ipykernel`` imported and ``get_ipython().kernel`` set."""
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # no widgets: the text bar (tqdm.auto warned there)


def test_progress_none_shows_bars_in_a_notebook_not_in_a_batch_job(notebook, monkeypatch):
    """Jupyter's stderr is not a terminal, so progress=None showed no bar in a notebook."""
    monkeypatch.setattr(sys, "stderr", open("/dev/null", "w"))  # not a terminal, as in a notebook or a batch job
    items = list(range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm.auto's "IProgress not found" would be one
        bar = _progress.progress(items, desc="x", enabled=None)
    assert isinstance(bar, tqdm_std.tqdm) and list(bar) == items and bar.total == 3
    bar.close()
    monkeypatch.delitem(sys.modules, "ipykernel")  # the same process, no kernel: a batch job
    assert _progress.progress(items, desc="x", enabled=None) is items


def test_progress_true_without_tqdm_says_so_once(monkeypatch):
    """progress=True did nothing, unsaid, where tqdm is not installed (it is only in the demo extra)."""
    import trak_core

    monkeypatch.setitem(sys.modules, "tqdm", None)  # an import of tqdm or tqdm.std fails
    monkeypatch.setitem(sys.modules, "tqdm.std", None)
    monkeypatch.setattr(_progress, "_said_no_tqdm", [])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    model = trak_core.MLP(5, 4, 3)
    trak = trak_core.TRAK(model, proj_dim=8, progress=True)
    with pytest.warns(UserWarning, match=r"progress=True shows progress bars with tqdm, which is not installed: "
                                         r"pip install tqdm") as caught:
        trak.featurize(model.init(seed=0), [(x, y)])
        trak.score([(x[:2], y[:2])])
    assert sum("tqdm" in str(w.message) for w in caught) == 1
    assert caught[0].filename == __file__  # the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _progress.progress([1], desc="x", enabled=None) == [1]  # None asks for nothing: no warning


def test_refit_shows_a_bar_over_the_checkpoints(capsys):
    """refit refactorizes every checkpoint (O(k^3) each) and showed no progress."""
    import trak_core

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    model = trak_core.MLP(5, 4, 3)
    trak = trak_core.TRAK(model, proj_dim=8, progress=True)
    for seed in range(3):
        trak.featurize(model.init(seed=seed), [(x, y)])
    capsys.readouterr()
    trak.refit(0.5)
    assert "refit lambda_reg=0.5:   0%|          | 0/3" in capsys.readouterr().err  # tqdm skips fast updates
    quiet = trak_core.TRAK(model, proj_dim=8, progress=False)
    quiet.featurize(model.init(seed=0), [(x, y)])
    capsys.readouterr()
    quiet.refit(0.5)
    assert capsys.readouterr().err == ""


def test_score_shows_a_bar_while_it_scores_the_last_targets(monkeypatch, capsys):
    """score()'s only bar went over pulling and featurizing the target batches: it was full and erased before the
    last group of targets was scored, so the passes over every checkpoint's stored features (98% of an on-disk
    store's score) ran with no bar at all."""
    import trak_core
    import trak_core.trak as trak_module

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    model = trak_core.MLP(5, 4, 3)
    trak = trak_core.TRAK(model, proj_dim=8, progress=True)
    for seed in range(2):
        trak.featurize(model.init(seed=seed), [(x[:20], y[:20]), (x[20:], y[20:])])
    original, shown = trak_module.checkpoint_scores, []

    def scoring(*args, **kwargs):  # each checkpoint's pass: which bars are on the terminal meanwhile
        shown.append([bar.desc for bar in _progress._live_bars()])
        return original(*args, **kwargs)

    monkeypatch.setattr(trak_module, "checkpoint_scores", scoring)
    scores = trak.score([(x[:3], y[:3]), (x[3:6], y[3:6])])  # one group: scored after the last batch is pulled
    assert tuple(scores.shape) == (40, 6) and len(shown) == 2
    assert all(any(desc.startswith("score") for desc in descs) for descs in shown), shown
    assert not _progress._live_bars()  # every bar closed when score returns


def test_score_bar_total_leaves_out_the_leading_empty_batches(monkeypatch):
    """score() pulls the leading empty target batches before its bar starts, but counted them in the bar's total:
    two empty batches then two with targets ended the bar at 2/4."""
    import trak_core
    import trak_core.trak as trak_module

    made, original = [], trak_module.progress

    def recorded(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.integers(0, 3, 20)
    model = trak_core.MLP(5, 4, 3)
    trak = trak_core.TRAK(model, proj_dim=8, progress=True)
    trak.featurize(model.init(seed=0), [(x, y)])
    monkeypatch.setattr(trak_module, "progress", recorded)
    trak.score([(x[:0], y[:0]), (x[:0], y[:0]), (x[:3], y[:3]), (x[3:6], y[3:6])])
    bar = next(bar for bar in made if bar.desc == "score")
    assert (bar.n, bar.total) == (2, 2)
