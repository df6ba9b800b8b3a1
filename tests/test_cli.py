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
             pytest.param([SCRIPT] if SCRIPT else None, id="trak-core script",
                          marks=pytest.mark.skipif(SCRIPT is None, reason="the trak-core script is not on PATH"))]

TOP_HELP = """\
usage: trak-core {demo,compare} [options]
       trak-core [-h | --help | --version]

Training-data attribution with TRAK on the Python Array API.

commands:
  demo     train an MLP ensemble on digits, attribute with TRAK, measure LDS
  compare  one MLP on every installed backend: agreement with NumPy, seconds

options:
  -h, --help  show this help message and exit
  --version   show program's version number and exit

Run 'trak-core COMMAND --help' for the options of a command.
"""

COMMAND_LIST = """
commands:
  demo     train an MLP ensemble on digits, attribute with TRAK, measure LDS
  compare  one MLP on every installed backend: agreement with NumPy, seconds

Run 'trak-core --help' for more.
"""

DEMO_BACKEND = "torch" if importlib.util.find_spec("torch") else "numpy"
#: every option of each command's --help, with the default its help text must state
DEFAULTS = {
    "demo": {"--backend": DEMO_BACKEND, "--n-train": "1000", "--n-targets": "100", "--checkpoints": "5",
             "--hidden": "64", "--proj-dim": "2048", "--lambda-reg": "auto", "--subsets": "64", "--seed": "0",
             "--png": "trak_demo.png", "--quiet": "False"},
    "compare": {"--n-train": "1000", "--n-targets": "100", "--hidden": "64", "--checkpoints": "3",
                "--proj-dim": "2048", "--lambda-reg": "1.0"},
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
    assert demo_help["--subsets"] == "models retrained on random halves for LDS (default: 64)"
    compare_help = _option_help(_run(MODULE, "compare", "--help").stdout)
    assert compare_help["--proj-dim"] == "projection dimension k (default: 2048)"
    assert compare_help["--lambda-reg"] == "ridge lambda (default: 1.0)"


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
    assert capsys.readouterr().err.endswith("trak-core compare: error: argument --lambda-reg: invalid float value: 'x'\n")


def test_the_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"trak-core": "trak_core.cli:main"}
    assert sorted(cli.COMMANDS) == ["compare", "demo"]
