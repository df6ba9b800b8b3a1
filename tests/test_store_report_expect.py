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
    assert "beyond --expect: checkpoint [4] is stored at an index the array of 3 jobs does not have" in out


def test_without_expect_or_within_it_nothing_is_beyond(gapped, capsys):
    assert store_report.describe(str(gapped))["beyond_expect"] == []
    assert store_report.describe(str(gapped), expect=5)["beyond_expect"] == []
    store_report.main([str(gapped), "--expect", "5"])
    assert "beyond --expect" not in capsys.readouterr().out


def _listed(stored, expect):
    """The missing indices, listed one by one: the reference for small ``expect``."""
    return sorted(set(range(expect)) - set(stored))


@pytest.mark.parametrize("expect", [0, 1, 3, 5, 30, 1100])
def test_missing_is_counted_and_given_as_ranges(gapped, expect):
    report = store_report.describe(str(gapped), expect=expect)
    every = _listed([0, 4], expect)
    assert report["missing"] == every and report["missing_count"] == len(every) and not report["missing_truncated"]
    assert [i for a, b in report["missing_ranges"] for i in range(a, b + 1)] == every


def test_a_huge_expect_is_reported_without_listing_it(gapped, capsys):
    """``--expect 1000000000`` built a list of every missing index: gigabytes, minutes (3 million: 410 MB)."""
    import json
    import tracemalloc

    tracemalloc.start()
    report = store_report.describe(str(gapped), expect=10**9)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2**20, peak  # the store's metadata read, not the indices
    assert report["missing_count"] == 10**9 - 2 and report["missing_ranges"] == [[1, 3], [5, 10**9 - 1]]
    assert report["missing"] == [1, 2, 3] + list(range(5, 5 + 99_997)) and report["missing_truncated"]
    store_report.main([str(gapped), "--expect", str(10**9)])
    assert "missing (no group yet): 999,999,998 checkpoints, 1 to 3, 5 to 999,999,999\n" in capsys.readouterr().out
    store_report.main([str(gapped), "--expect", str(2**64), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["missing_count"] == 2**64 - 2 and len(printed["missing"]) == store_report.MISSING_LISTED


def test_few_missing_are_listed_and_many_ranges_are_cut(capsys):
    render = store_report._missing_line
    assert render({"missing": [1, 2, 3], "missing_count": 3}) == "missing (no group yet): [1, 2, 3]"
    ranges = [[i, i] for i in range(0, 60, 2)] + [[61, 100]]  # 30 single indices and one range
    line = render({"missing": [], "missing_count": 70, "missing_ranges": ranges})
    assert line == ("missing (no group yet): 70 checkpoints, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, and 21 more ranges "
                    "(--json lists them)")


@pytest.mark.parametrize("value", [str(2**64 + 1), "-1"])
def test_an_expect_no_array_can_have_is_a_usage_error(gapped, value, capsys):
    with pytest.raises(SystemExit) as stop:
        store_report.main([str(gapped), "--expect", value])
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith(
        f"trak-core store: error: --expect must be from 0 to 2**64 (the number of checkpoints; their indices are "
        f"below 2**64), got {value}\n")
    with pytest.raises(trak_core.errors.TrakValueError, match="expect must be from 0 to 2"):
        store_report.describe(str(gapped), expect=int(value))


def test_counts_of_one_are_singular(gapped, tmp_path):
    """"a list of the 1 checkpoints 0 to 0", "the array of 1 jobs", "first batch of 1 rows"."""
    text = store_report.render(store_report.describe(str(gapped), expect=1))
    assert "beyond --expect: checkpoint [4] is stored at an index the array of 1 job does not have" in text
    text = store_report.render(store_report.describe(str(gapped), expect=4))
    assert "checkpoints [4] are stored" not in text and "checkpoint [4] is stored" in text
    path = tmp_path / "one"
    torch.manual_seed(0)
    x, y = torch.randn(3, 6), torch.randint(0, 3, (3,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    trak_core.TRAK(model, proj_dim=4, progress=False, store=path).featurize(model.state_dict(), [(x[:1], y[:1]),
                                                                                                (x[1:], y[1:])])
    text = store_report.render(store_report.describe(str(path)))
    assert "training data: first batch of 1 row\n" in text
    assert "TRAK.open(path, model, checkpoints) takes a list of its 1 checkpoint (index 0), or a mapping " \
           "{0: checkpoint}\n" in text


@pytest.mark.parametrize("args", [["--json"], [], ["--json", "--expect", "100000"], ["--verify"]])
def test_a_closed_pipe_ends_the_report_quietly(gapped, args):
    """``trak-core store PATH --json | head -c 100``: a BrokenPipeError traceback, exit status 1."""
    import sys

    from test_cli import closed_pipe_run

    done = closed_pipe_run([sys.executable, "-m", "trak_core", "store", str(gapped), *args])
    assert (done.returncode, done.stderr) == (141, "")
