"""``trak-core compare``'s rank check: the smallest per-target Spearman correlation, whatever the order of the
targets, against ``scipy.stats.spearmanr``; targets whose reference scores are all equal are left out and said."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from trak_core import compare


def _columns(rng, n=30):
    """A reference whose target 0 is constant (Spearman undefined), and scores that agree on target 1 and not on 2."""
    reference = rng.normal(size=(n, 3))
    reference[:, 0] = 0.25
    scores = reference.copy()
    scores[:, 2] = rng.normal(size=n)  # another ranking altogether
    return scores, reference


@pytest.mark.parametrize("order", [[0, 1, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
def test_the_verdict_does_not_depend_on_the_order_of_the_targets(order, rng):
    """``min`` over a list holding NaN returned NaN with the constant target first and 1.0 or the low value
    otherwise: the same scores passed or failed as the targets were ordered."""
    scores, reference = _columns(rng)
    expected = spearmanr(scores[:, 2], reference[:, 2])[0]  # the one target that disagrees
    rho, left_out = compare.min_spearman(scores[:, order], reference[:, order])
    assert rho == pytest.approx(expected, abs=1e-12) and left_out == [order.index(0)]
    error, rho = compare.agreement(scores[:, order], reference[:, order])
    assert rho == pytest.approx(expected, abs=1e-12)
    assert not compare.passes("float32", 0.0, rho)


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_a_constant_target_is_left_out_and_the_others_decide(order, rng):
    scores, reference = _columns(rng)
    rho, left_out = compare.min_spearman(scores[:, order], reference[:, order])  # targets 0 and 1: they agree
    assert rho == pytest.approx(1.0, abs=1e-12) and left_out == [order.index(0)]
    assert compare.passes("float32", 0.0, rho)


@pytest.mark.parametrize("order", [[1, 2], [2, 1]])
@pytest.mark.filterwarnings("ignore:An input array is constant")
def test_a_backend_constant_where_the_reference_varies_fails(order, rng):
    scores, reference = _columns(rng)
    scores[:, 2] = 3.0  # scipy: undefined; here a failure, in either order
    assert np.isnan(spearmanr(scores[:, 2], reference[:, 2])[0])
    rho, left_out = compare.min_spearman(scores[:, order], reference[:, order])
    assert np.isnan(rho) and left_out == [] and not compare.passes("float32", 0.0, rho)


def test_no_target_with_ranks_fails_and_says_why(rng):
    reference = np.ones((10, 2))
    rho, left_out = compare.min_spearman(reference.copy(), reference)
    assert np.isnan(rho) and left_out == [0, 1] and not compare.passes("float32", 0.0, rho)
    assert compare.passes("float64", 0.0, rho)  # float64 rows are judged on the relative error alone
    assert compare._left_out_note(left_out, 2) == [
        "min Spearman: undefined for all 2 targets (the reference's scores of each are all equal: no ranks to "
        "compare), so no float32 row can meet the rank tolerance"]


def test_the_output_says_how_many_targets_are_left_out():
    assert compare._left_out_note([], 5) == []
    assert compare._left_out_note([0, 3], 5) == [
        "min Spearman: over 3 of 5 targets; 2 left out, [0, 3], whose reference scores are all equal (no ranks: "
        "undefined); the relative error covers them"]
    assert compare._left_out_note(list(range(12)), 20)[0].startswith(
        "min Spearman: over 8 of 20 targets; 12 left out, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] ..., whose")


def test_one_target_is_one_target(monkeypatch, capsys):
    """The header said "60 train x 1 targets"."""
    pytest.importorskip("sklearn", reason="compare uses scikit-learn's bundled digits")
    runners = compare._runners()
    monkeypatch.setattr(compare, "_runners", lambda: {"numpy": runners["numpy"]})
    rows = compare.main(["--n-train", "60", "--n-targets", "1", "--hidden", "8", "--proj-dim", "32",
                         "--checkpoints", "1"])
    out = capsys.readouterr().out
    assert out.startswith("digits MLP 64-8-10, 60 train x 1 target, 1 checkpoint, k = 32")
    assert all(row["spearman_left_out"] == [] for row in rows) and "min Spearman: over" not in out
