"""The ``trak-core`` command line, driven as a user drives it: help, version, unknown commands, options.

Run through ``python -m trak_core.cli`` (and the ``trak-core`` console script of pyproject.toml's
``[project.scripts]`` when it is on PATH). Nothing here runs the demo or the comparison: only help,
version and parse errors, which exit before any work.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys

import pytest

import trak_core
from trak_core import cli, compare, demo

MODULE = [sys.executable, "-m", "trak_core.cli"]
SCRIPT = shutil.which("trak-core")
LAUNCHERS = [pytest.param(MODULE, id="python -m trak_core.cli"),
             pytest.param([sys.executable, "-m", "trak_core"], id="python -m trak_core"),
             pytest.param([SCRIPT] if SCRIPT else None, id="trak-core script",
                          marks=pytest.mark.skipif(SCRIPT is None, reason="the trak-core script is not on PATH"))]

TOP_HELP = """\
usage: trak-core {demo,compare,store} [options]
       trak-core [-h | --help | --version]

Training-data attribution with TRAK on the Python Array API.

commands:
  demo     train an MLP ensemble on digits, attribute with TRAK, measure LDS
  compare  one MLP on every installed backend: agreement with NumPy, seconds
  store    what an on-disk store holds: checkpoints, progress, saved scores

options:
  -h, --help  show this help message and exit
  --version   show program's version number and exit

Run 'trak-core COMMAND --help' for the options of a command.
"""

COMMAND_LIST = """
commands:
  demo     train an MLP ensemble on digits, attribute with TRAK, measure LDS
  compare  one MLP on every installed backend: agreement with NumPy, seconds
  store    what an on-disk store holds: checkpoints, progress, saved scores

Run 'trak-core --help' for more.
"""

DEMO_BACKEND = "torch" if importlib.util.find_spec("torch") else "numpy"
#: every option of each command's --help, with the default its help text must state
DEFAULTS = {
    "demo": {"--backend": DEMO_BACKEND, "--n-train": "1000", "--n-targets": "100", "--checkpoints": "5",
             "--hidden": "64", "--proj-dim": "2048", "--lambda-reg": "auto", "--subsets": "64", "--seed": "0",
             "--png": "trak_demo.png", "--quiet": "False"},
    "compare": {"--n-train": "1000", "--n-targets": "100", "--hidden": "64", "--checkpoints": "3",
                "--proj-dim": "2048", "--lambda-reg": "auto"},
}


def _run(command: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands_with_one_line_each(launcher, flag):
    done = _run(launcher, flag)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == TOP_HELP


def test_no_arguments_prints_the_help_and_exits_2():
    done = _run(MODULE)
    assert (done.returncode, done.stdout, done.stderr) == (2, TOP_HELP, "")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_version(launcher):
    done = _run(launcher, "--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"trak-core {trak_core.__version__}\n", "")
    assert trak_core.__version__ == "0.1.0"


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("command,closest", [("bogus", None), ("demi", "demo"), ("Demo", "demo"),
                                             ("compar", "compare"), ("comp", "compare"), ("help", None)])
def test_unknown_command_exits_2_naming_the_closest(launcher, command, closest):
    done = _run(launcher, command, "--n-train", "10")
    assert done.returncode == 2 and done.stdout == ""
    hint = f"did you mean {closest!r}?\n" if closest else ""
    assert done.stderr == f"trak-core: unknown command {command!r}\n{hint}{COMMAND_LIST}"


def test_unknown_option_before_the_command_exits_2():
    done = _run(MODULE, "--bogus")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.endswith("trak-core: error: unrecognized arguments: --bogus\n")


@pytest.mark.parametrize("command,usage", [
    (MODULE + ["demo"], "usage: trak-core demo [-h] [--backend {torch,numpy}]"),
    (MODULE + ["compare"], "usage: trak-core compare [-h] [--n-train N_TRAIN]"),
    ([sys.executable, "-m", "trak_core.demo"], "usage: python -m trak_core.demo [-h]"),
])
def test_command_help_names_its_program(command, usage):
    done = _run(command, "--help")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[0].startswith(usage), done.stdout
    if command[-1] != "trak_core.demo":
        assert "python -m" not in done.stdout


@pytest.mark.parametrize("command,prog", [(MODULE + ["demo"], "trak-core demo"),
                                          (MODULE + ["compare"], "trak-core compare"),
                                          ([sys.executable, "-m", "trak_core.demo"], "python -m trak_core.demo")])
def test_command_errors_name_its_program(command, prog):
    done = _run(command, "--n-train", "x")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.endswith(f"{prog}: error: argument --n-train: invalid int value: 'x'\n")


def _option_help(text: str) -> dict[str, str]:
    """``{option: its help text}`` from the options section of an argparse --help, whitespace collapsed."""
    section = text.split("\noptions:\n", 1)[1]
    entries: dict[str, list[str]] = {}
    current = None
    for line in section.splitlines():
        if line.startswith("  -"):
            head, _, rest = line.strip().partition("  ")
            # "-h, --help" -> "--help"; "--n-train N_TRAIN" -> "--n-train"; "--backend {torch,numpy}" -> "--backend"
            current = [word for word in head.replace(",", " ").split() if word.startswith("-")][-1]
            entries[current] = [rest]
        elif line.startswith("   ") and current is not None:
            entries[current].append(line)
        else:
            current = None
    return {option: " ".join(" ".join(lines).split()) for option, lines in entries.items()}


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_every_option_has_help_that_states_its_default(command):
    done = _run(MODULE, command, "--help")
    assert done.returncode == 0
    found = _option_help(done.stdout)
    assert found.pop("--help") == "show this help message and exit"
    assert sorted(found) == sorted(DEFAULTS[command])
    for option, text in found.items():
        default = f"(default: {DEFAULTS[command][option]})"
        assert text.endswith(default), (option, text)
        assert len(text) > len(default) + 5, f"{option} has no help text besides its default: {text!r}"


def test_the_options_the_user_asked_about():
    """The report of issue 16: compare's options and demo's --seed had no help, --subsets showed no default."""
    demo_help = _option_help(_run(MODULE, "demo", "--help").stdout)
    assert demo_help["--seed"] == ("random seed of the data split, the ensemble's training, the projection and "
                                   "the LDS subsets (default: 0)")
    assert demo_help["--subsets"] == "models retrained on random halves for LDS (at least 3) (default: 64)"
    compare_help = _option_help(_run(MODULE, "compare", "--help").stdout)
    assert compare_help["--proj-dim"] == "projection dimension k (default: 2048)"
    assert compare_help["--lambda-reg"] == ("ridge lambda: a number >= 0, or 'auto' to choose it per checkpoint from "
                                            "the features (TRAK's default) (default: auto)")


PARSERS = {"trak-core": cli.parser(), "trak-core demo": demo._parser("trak-core demo"),
           "trak-core compare": compare._parser("trak-core compare")}


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_action_of_every_parser_has_help_with_its_default(name):
    parser = PARSERS[name]
    assert parser.prog == name
    formatter = parser._get_formatter()
    checked = 0
    for action in parser._actions:
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        shown = formatter._expand_help(action)  # what --help prints, with the formatter's default suffix
        assert f"(default: {action.default})" in shown, (name, action.option_strings, shown)
        checked += 1
    assert checked == len(DEFAULTS.get(name.removeprefix("trak-core "), {}))


def test_the_dispatcher_passes_the_program_name(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage: trak-core demo [-h]")
    with pytest.raises(SystemExit) as stop:
        cli.main(["compare", "--lambda-reg", "x"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith(
        "trak-core compare: error: argument --lambda-reg: expected 'auto' or a finite number >= 0, got 'x'\n")


def test_the_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"trak-core": "trak_core.cli:main"}
    assert sorted(cli.COMMANDS) == ["compare", "demo", "store"]


def _no_work(monkeypatch):
    """Make loading the digits or training fail loudly: an option error must come before either."""
    def work(*args, **kwargs):
        raise AssertionError("the command loaded data or trained before checking its options")

    monkeypatch.setattr(demo, "load_digits_split", work)
    monkeypatch.setattr(demo, "_recipe", work)
    monkeypatch.setattr("trak_core.demo.data.load_digits_split", work)
    monkeypatch.setattr(compare, "_weights", work)


RANGE = "argument {flag}: must be {allowed} ({why}), got {value}"
N_TRAIN_WHY = {"demo": "the LDS retrains on random halves of it; the 1797 digits less one target",
               "compare": "Spearman ranks the training examples; the 1797 digits less one target"}
SEED_WHY = "the seeds of numpy, torch and the projection are non-negative"
TOO_MANY = ("argument --n-train/--n-targets: --n-train + --n-targets must be at most 1797 (the digits data set has "
            "1797 images), got {} + {} = {}; lower one of them")
LAMBDA = "argument --lambda-reg: expected 'auto' or a finite number >= 0, got {!r}"


def _range(flag, allowed, why, value):
    return RANGE.format(flag=flag, allowed=allowed, why=why, value=value)


DEMO_ERRORS = [  # the audit's three first: they trained everything, then died with a traceback
    (["--subsets", "2"], _range("--subsets", "at least 3",
                                "LDS ranks the outputs of the retrained models, which takes at least 3", 2)),
    (["--checkpoints", "0"], _range("--checkpoints", "at least 1", "models in the ensemble", 0)),
    (["--n-targets", "0"], _range("--n-targets", "from 1 to 1795", "test digits to attribute", 0)),
    (["--n-train", "1"], _range("--n-train", "from 2 to 1796", N_TRAIN_WHY["demo"], 1)),
    (["--n-train", "3000"], _range("--n-train", "from 2 to 1796", N_TRAIN_WHY["demo"], 3000)),
    (["--n-train", "1700"], TOO_MANY.format(1700, 100, 1800)),
    (["--hidden", "0"], _range("--hidden", "at least 1", "units of the hidden layer", 0)),
    (["--proj-dim", "-5"], _range("--proj-dim", "at least 1", "the projection dimension k", -5)),
    (["--seed", "-1"], _range("--seed", "from 0 to 2**63 - 1", SEED_WHY, -1)),
    (["--seed", str(2**63)], _range("--seed", "from 0 to 2**63 - 1", SEED_WHY, 2**63)),
    (["--lambda-reg", "-1"], LAMBDA.format("-1")),
    (["--lambda-reg", "nan"], LAMBDA.format("nan")),
    (["--lambda-reg", "inf"], LAMBDA.format("inf")),
    pytest.param(["--png", "no/such/folder/x.png"],
                 ("argument --png: the folder {cwd}/no/such/folder does not exist; create it, or pass --png '' for "
                  "no figure"),
                 marks=pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                          reason="without matplotlib, --png is that error")),
]
COMPARE_ERRORS = [
    (["--n-targets", "0"], _range("--n-targets", "from 1 to 1795", "test digits to attribute", 0)),
    (["--n-train", "1"], _range("--n-train", "from 2 to 1796", N_TRAIN_WHY["compare"], 1)),
    (["--n-train", "1000", "--n-targets", "900"], TOO_MANY.format(1000, 900, 1900)),
    (["--checkpoints", "0"], _range("--checkpoints", "at least 1", "independently trained models", 0)),
    (["--hidden", "0"], _range("--hidden", "at least 1", "units of the hidden layer", 0)),
    (["--proj-dim", "0"], _range("--proj-dim", "at least 1", "the projection dimension k", 0)),
    (["--lambda-reg", "-0.5"], LAMBDA.format("-0.5")),
]


def _cases(command, cases):
    """``(command, args, message)`` for each case, keeping a ``pytest.param``'s marks."""
    return [pytest.param(command, *case.values, marks=case.marks) if hasattr(case, "marks") else (command, *case)
            for case in cases]


@pytest.mark.parametrize("command,args,message", _cases("demo", DEMO_ERRORS) + _cases("compare", COMPARE_ERRORS))
def test_out_of_range_options_are_usage_errors_before_any_work(command, args, message, monkeypatch, capsys,
                                                               tmp_path):
    monkeypatch.chdir(tmp_path)
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        cli.main([command, *args])
    out, err = capsys.readouterr()
    assert (stop.value.code, out) == (2, "")
    assert err.startswith(f"usage: trak-core {command} [-h]")
    assert err.endswith(f"trak-core {command}: error: {message.format(cwd=tmp_path)}\n")


@pytest.mark.parametrize("args", [["--subsets", "2"], ["--checkpoints", "0"], ["--n-targets", "0"]])
def test_the_audited_demo_commands_exit_2_at_once(args):
    done = _run([sys.executable, "-m", "trak_core.demo"], *args)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: python -m trak_core.demo [-h]")
    assert "Traceback" not in done.stderr and f"error: argument {args[0]}: must be " in done.stderr


@pytest.mark.parametrize("missing,args,message", [
    ("torch", ["--backend", "torch"],
     "argument --backend: PyTorch is not installed; pip install torch (or, in a trak-core checkout, pip install -e "
     "\".[torch]\"); a bare torch may be a multi-GB CUDA build: for a CPU-only or a given CUDA version's wheel, "
     "install torch first with the command from https://pytorch.org/get-started/locally/; or pass --backend numpy"),
    ("matplotlib", [],
     "argument --png: the figure needs matplotlib (pip install matplotlib (or, in a trak-core checkout, pip install "
     "-e \".[demo]\")); pass --png '' for no figure"),
])
def test_demo_names_a_missing_package_before_any_work(missing, args, message, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        demo.main(args, prog="trak-core demo")
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith(f"trak-core demo: error: {message}\n")


@pytest.mark.parametrize("value,parsed", [("auto", "auto"), ("1", 1.0), ("0", 0.0), ("2.5e3", 2500.0)])
def test_compare_and_demo_take_lambda_auto_or_a_number(value, parsed):
    for parser in (compare._parser(), demo._parser()):
        assert parser.parse_args(["--lambda-reg", value]).lambda_reg == parsed
    assert compare._parser().parse_args([]).lambda_reg == "auto"  # TRAK's default, as the demo's


def closed_pipe_run(args: list[str], buffered: bool = False) -> subprocess.CompletedProcess:
    """Run ``args`` with a standard output whose reader has gone (``| head`` done reading) before the first write.

    ``buffered``: with Python's standard output block-buffered, as in a shell without ``PYTHONUNBUFFERED`` (writes
    then fail at the flush after the command, not at the ``print``)."""
    import os

    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"} if buffered else None
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(args, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    finally:
        os.close(write)


TINY = {"demo": ["--backend", "numpy", "--n-train", "20", "--n-targets", "1", "--subsets", "3", "--checkpoints", "1",
                 "--hidden", "4", "--proj-dim", "8", "--png", "", "--quiet"],
        "compare": ["--n-train", "30", "--n-targets", "1", "--hidden", "4", "--proj-dim", "8", "--checkpoints", "1"]}


@pytest.mark.parametrize("args", [
    pytest.param([sys.executable, "-m", "trak_core", "demo", *TINY["demo"]], id="trak-core demo"),
    pytest.param([sys.executable, "-m", "trak_core.demo", *TINY["demo"]], id="python -m trak_core.demo"),
    pytest.param([*MODULE, "compare", *TINY["compare"]], id="trak-core compare"),
])
def test_a_closed_pipe_ends_every_command_quietly(args):
    """``trak-core store PATH --json | head -c 100`` printed a BrokenPipeError traceback (exit status 1; 120 where
    the write failed at exit), as the demo and compare did: now nothing on standard error and the shell's status
    for SIGPIPE, 141. (``--help`` was quiet already: argparse drops its write errors. ``store``:
    ``test_store_report_expect.py``.)"""
    pytest.importorskip("sklearn", reason="the demo and compare use scikit-learn's bundled digits")
    done = closed_pipe_run(args)
    assert (done.returncode, done.stderr) == (cli.CLOSED_PIPE_STATUS, "")
    assert cli.CLOSED_PIPE_STATUS == 141


@pytest.mark.parametrize("closed", [False, True])
def test_a_broken_pipe_of_another_pipe_is_the_command_s_error(closed):
    """A BrokenPipeError of another pipe (a socket's, a subprocess's) while standard output is open was taken for a
    closed standard output: exit 141, nothing said. It is raised as it is now; with standard output closed, 141."""
    code = ("from trak_core.cli import quiet_on_closed_pipe\n"
            "def run():\n    raise BrokenPipeError(32, 'the socket to the object store closed')\n"
            "quiet_on_closed_pipe(run)")
    done = closed_pipe_run([sys.executable, "-c", code]) if closed else _run([sys.executable, "-c"], code)
    if closed:
        assert (done.returncode, done.stderr) == (cli.CLOSED_PIPE_STATUS, "")
    else:
        assert done.returncode == 1 and "BrokenPipeError: [Errno 32] the socket to the object store closed" in \
            done.stderr


def test_an_open_pipe_still_gets_everything():
    done = _run(MODULE, "--help")
    assert (done.returncode, done.stdout, done.stderr) == (0, TOP_HELP, "")


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_store_path_is_a_usage_error(path, capsys):
    """``trak-core store ""`` said "no trak-core store at :"."""
    from trak_core import store_report

    with pytest.raises(SystemExit) as stop:
        cli.main(["store", path])
    out, err = capsys.readouterr()
    assert (stop.value.code, out) == (2, "") and err.startswith("usage: trak-core store [-h]")
    assert err.endswith(f"trak-core store: error: PATH is empty ({path!r}): pass the store's directory or URL, the "
                        "path given to TRAK(..., store=path)\n")
    with pytest.raises(trak_core.errors.TrakValueError, match=r"^path is empty \(''\): pass the store's directory"):
        store_report.describe("")
