"""``trak-core store PATH --expect N``: checkpoints stored at index N or above are named, not passed over."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")
zarr = pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

import trak_core  # noqa: E402
from trak_core import store_report  # noqa: E402


@pytest.fixture(scope="module")
def gapped(tmp_path_factory):
    """A store holding checkpoints 0 and 4 only (jobs 0 and 4 of an array)."""
    path = tmp_path_factory.mktemp("expect") / "store"
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    for index in (0, 4):
        torch.manual_seed(index)
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        trak_core.TRAK(model, proj_dim=16, progress=False, store=path).featurize(model.state_dict(), [(x, y)],
                                                                                index=index)
    return path


def test_expect_names_checkpoints_beyond_the_array(gapped, capsys):
    report = store_report.describe(str(gapped), expect=3)
    assert report["missing"] == [1, 2] and report["beyond_expect"] == [4]
    store_report.main([str(gapped), "--expect", "3"])
    out = capsys.readouterr().out
    assert "beyond --expect: checkpoints [4]" in out and "array of 3 jobs" in out


def test_without_expect_or_within_it_nothing_is_beyond(gapped, capsys):
    assert store_report.describe(str(gapped))["beyond_expect"] == []
    assert store_report.describe(str(gapped), expect=5)["beyond_expect"] == []
    store_report.main([str(gapped), "--expect", "5"])
    assert "beyond --expect" not in capsys.readouterr().out
