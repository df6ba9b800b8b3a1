"""Memory of ``score`` with many targets: the result held about once.

At n_train = 200,000 and 2,000 targets in batches of 10 or 100 (a 1.6 GB float32 result), the groups' columns were
joined by a concatenation: peak RSS 2.0x the result above the opened store; now 1.32x. Checked here on structure
(the widths each pass multiplies; each piece freed before the next rows of the result are written), with scores
against a float64 NumPy reference.
"""
import numpy as np

import trak_core._target_groups as groups
import trak_core.trak as trak_module
from trak_core import TRAK, SoftmaxRegression

N_TRAIN = 2000


def _fitted(checkpoints=2):
    rng = np.random.default_rng(0)
    model = SoftmaxRegression(4, 3)
    trak = TRAK(model, proj_dim=8, progress=False)
    x, y = rng.normal(size=(N_TRAIN, 4)), rng.integers(0, 3, N_TRAIN)
    for c in range(checkpoints):
        trak.featurize(model.init(seed=c), [(x, y)])
    return trak, rng.normal(size=(1000, 4)), rng.integers(0, 3, 1000)


def _reference(trak, targets):
    """The uniform ensemble in float64 NumPy: mean_c Phi_c (Phi_c^T Phi_c + lambda_c I)^-1 phi_c^T, times mean_c Q_c."""
    total, weight = 0.0, 0.0
    for c, entry in enumerate(trak.store):
        phi = np.asarray(entry.features, dtype=np.float64)
        target = np.asarray(trak.features(targets, checkpoint=c), dtype=np.float64)
        kernel = phi.T @ phi + trak.lambdas[c] * np.eye(phi.shape[1])
        total = total + phi @ np.linalg.solve(kernel, target.T)
        weight = weight + np.asarray(entry.out_to_loss, dtype=np.float64)
    n = len(trak.store)
    return (total / n) * (weight / n)[:, None]


def test_a_target_batch_wider_than_a_group_is_one_pass_and_the_groups_join_to_the_reference(monkeypatch):
    """A batch wider than a group's limit stays a group of its own (one pass over each checkpoint's features: the
    batch size is the user's memory-for-passes choice), and the groups' pieces join into the reference scores."""
    monkeypatch.setattr(groups, "SCORE_GROUP_BYTES", 8 * N_TRAIN * 100)  # groups of 100 targets
    monkeypatch.setattr(groups, "PIECE_BYTES", 8 * 100 * 300)  # pieces of 300 rows
    trak, xt, yt = _fitted()
    widths = []
    original = trak_module.checkpoint_scores
    monkeypatch.setattr(trak_module, "checkpoint_scores",
                        lambda features, factor, target, **k: widths.append(target.shape[0])
                        or original(features, factor, target, **k))
    scores = trak.score([(xt[:60], yt[:60]), (xt[60:120], yt[60:120]), (xt[120:], yt[120:])])  # 60 + 60 + 880
    assert widths == [120, 120, 880, 880]  # two groups, two checkpoints each
    expected = _reference(trak, [(xt, yt)])
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def test_many_groups_cut_in_pieces_give_the_reference_scores(monkeypatch):
    """20 groups of 50 targets, each cut in pieces of 100 rows, joined into one C-ordered result."""
    monkeypatch.setattr(groups, "SCORE_GROUP_BYTES", 8 * N_TRAIN * 50)  # 20 groups of 50 targets
    monkeypatch.setattr(groups, "PIECE_BYTES", 8 * 50 * 100)  # pieces of 100 rows
    trak, xt, yt = _fitted()
    scores = trak.score([(xt[i:i + 100], yt[i:i + 100]) for i in range(0, 1000, 100)])
    assert scores.shape == (N_TRAIN, 1000) and scores.dtype == np.float64 and scores.flags.c_contiguous
    expected = _reference(trak, [(xt, yt)])
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


class _Recorded(np.ndarray):
    """A result that records, at each write, which rows it is and how many pieces are still alive."""

    writes: list = []
    pieces: list = []

    def __setitem__(self, key, value):
        alive = [ref() is not None for ref in _Recorded.pieces]
        _Recorded.writes.append((key[0].start, sum(alive), alive))
        super().__setitem__(key, value)


class _Namespace:
    """NumPy's namespace whose ``empty`` makes a ``_Recorded``."""

    def __init__(self, xp):
        self._xp = xp

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def empty(self, shape, dtype=None, device=None):
        return np.empty(shape, dtype=dtype).view(_Recorded)


def test_joining_frees_each_piece_before_the_next_rows_are_written(monkeypatch):
    """The groups' columns were joined by a concatenation, which held every group's block until the whole result
    was made: twice the result (peak RSS 2.0x at n = 200,000; filling whole groups' columns into an allocated
    result would touch every row of it at the first group, so twice too). Now each group is cut in pieces of rows,
    and every piece is freed once copied, before the next rows of the result are written: the result and one row
    of pieces."""
    import weakref

    monkeypatch.setattr(groups, "PIECE_BYTES", 8 * 4 * 3)  # 3 rows of 4 targets
    rng = np.random.default_rng(3)
    blocks = [rng.normal(size=(10, 4)), rng.normal(size=(10, 4)), rng.normal(size=(10, 2))]  # the last narrower
    expected = np.concatenate(blocks, axis=1)
    xp = trak_module.namespace(blocks[0])
    columns = [groups.row_pieces(block, 4, xp=xp) for block in blocks]
    del blocks
    assert [[piece.shape for piece in pieces] for pieces in columns] == [
        [(3, 4), (3, 4), (3, 4), (1, 4)], [(3, 4), (3, 4), (3, 4), (1, 4)], [(3, 2), (3, 2), (3, 2), (1, 2)]]
    _Recorded.writes, _Recorded.pieces = [], [weakref.ref(piece) for pieces in columns for piece in pieces]
    joined = groups.join_columns(columns, xp=_Namespace(xp))
    assert columns == [] and np.array_equal(joined, expected)
    assert [row for row, _, _ in _Recorded.writes] == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9]
    for row, count, alive in _Recorded.writes:  # the pieces of rows already written are gone
        band = row // 3
        assert not any(alive[g * 4 + b] for g in range(3) for b in range(band)), (row, alive)
    assert max(count for _, count, _ in _Recorded.writes) == 12  # at the first write; 3 fewer per row of pieces
    assert [count for row, count, _ in _Recorded.writes if row == 9] == [3, 2, 1]


def test_torch_tensors_are_cut_and_joined_jax_arrays_concatenated_uncut(monkeypatch):
    """torch tensors on a CPU are cut and joined piece by piece like NumPy's; JAX arrays, which cannot be written to,
    are not cut (joining pieces built every row band, then concatenated them: 3x the result on JAX) and are joined by
    one concatenation, as before. Both equal NumPy's concatenation of the groups."""
    import pytest

    monkeypatch.setattr(groups, "PIECE_BYTES", 4 * 4 * 3)  # 3 rows of 4 float32 targets
    rng = np.random.default_rng(5)
    blocks = [rng.normal(size=(10, 4)).astype(np.float32) for _ in range(2)] + [rng.normal(size=(10, 2)).astype(
        np.float32)]
    expected = np.concatenate(blocks, axis=1)
    for name in ("torch", "jax.numpy"):
        lib = pytest.importorskip(name)
        arrays = [lib.asarray(block) for block in blocks]
        xp = trak_module.namespace(arrays[0])
        columns = [groups.row_pieces(array, 4, xp=xp) for array in arrays]
        assert [len(pieces) for pieces in columns] == ([4, 4, 4] if name == "torch" else [1, 1, 1])
        joined = groups.join_columns(columns, xp=xp)
        assert columns == [] and np.array_equal(np.asarray(joined), expected), name
