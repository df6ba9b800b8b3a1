"""The ``trak-core`` command: ``trak-core demo``, ``trak-core compare`` and ``trak-core store``.

In the style of git and pip: ``trak-core --help`` (or no arguments) lists the commands with one
line each, ``trak-core COMMAND --help`` shows the options of one command, and an unknown command
is an error (exit status 2) that names the closest command.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Callable

from . import __version__

PROG = "trak-core"
#: the exit status on a closed standard output (``trak-core store PATH --json | head``): 128 + SIGPIPE, as the shell
#: reports a program that SIGPIPE ended
CLOSED_PIPE_STATUS = 141

#: command -> (module with ``main(argv, prog=...)``, one line for ``trak-core --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("trak_core.demo", "train an MLP ensemble on digits, attribute with TRAK, measure LDS"),
    "compare": ("trak_core.compare", "one MLP on every installed backend: agreement with NumPy, seconds"),
    "store": ("trak_core.store_report", "what an on-disk store holds: checkpoints, progress, saved scores"),
}


def _commands() -> str:
    """One line per command, as ``trak-core --help`` and the unknown-command error list them."""
    width = max(len(name) for name in COMMANDS) + 2
    return "\n".join(f"  {name:<{width}}{line}" for name, (_, line) in COMMANDS.items())


def parser() -> argparse.ArgumentParser:
    """The top-level parser: ``--help`` (with the list of commands) and ``--version``.

    Each command parses its own options (``trak-core COMMAND --help``).
    """
    top = argparse.ArgumentParser(
        prog=PROG,
        usage=f"%(prog)s {{{','.join(COMMANDS)}}} [options]\n       %(prog)s [-h | --help | --version]",
        description="Training-data attribution with TRAK on the Python Array API.\n\ncommands:\n" + _commands(),
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return top


def _unknown(command: str) -> str:
    lines = [f"{PROG}: unknown command {command!r}"]
    close = difflib.get_close_matches(command, list(COMMANDS), n=1)
    if close:
        lines.append(f"did you mean {close[0]!r}?")
    lines += ["", "commands:", _commands(), "", f"Run '{PROG} --help' for more."]
    return "\n".join(lines)


def quiet_on_closed_pipe(run: Callable[[], object]) -> object:
    """Call ``run()`` and flush standard output; where the reader closed it (``| head``), exit quietly.

    A reader that stops early (``head -c 100``) closes the pipe: the next write, or the flush at exit, raised
    ``BrokenPipeError`` with a traceback. Here standard output is pointed at ``os.devnull`` (so that the flush at
    exit writes nowhere) and the exit status is ``CLOSED_PIPE_STATUS``, 141, with nothing on standard error. A
    ``BrokenPipeError`` of another pipe (a socket's) while standard output is open is raised as it is.

    Only a command that ended well (returned, or exited with status 0) becomes 141 when its output cannot be
    flushed. A command that failed (an exception, or ``SystemExit`` with another status) keeps its own error and
    status even where standard output's reader is gone: the output it had buffered is dropped, not reported as the
    cause.

    Parameters
    ----------
    run : callable
        The command, with no arguments.

    Returns
    -------
    object
        What ``run()`` returned.

    Raises
    ------
    SystemExit
        ``run``'s own, or with status 141 on a closed standard output after a command that ended well.
    BaseException
        Whatever else ``run`` raised, as it raised it.
    """
    try:
        result = run()
    except SystemExit as stop:
        if stop.code is None or stop.code == 0:  # --help, --version: ended well, so a closed pipe is the news
            _flush_or_exit_closed()
        else:
            _flush_dropping_a_closed_pipe()
        raise
    except BrokenPipeError:
        if not _stdout_closed():  # another pipe's (a socket's, a subprocess's): an error of the command's own
            _flush_dropping_a_closed_pipe()
            raise
        _point_stdout_at_devnull()
        raise SystemExit(CLOSED_PIPE_STATUS) from None
    except BaseException:  # the command's own error: it, not the closed pipe of the flush after it, is reported
        _flush_dropping_a_closed_pipe()
        raise
    _flush_or_exit_closed()
    return result


def _flush_or_exit_closed() -> None:
    """Flush standard output after a command that ended well; on a closed standard output, exit with status 141."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        _point_stdout_at_devnull()
        raise SystemExit(CLOSED_PIPE_STATUS) from None


def _flush_dropping_a_closed_pipe() -> None:
    """Flush standard output after a command that failed; where its reader is gone, drop what was buffered, so that
    the command's own error is reported (and the flush at exit does not fail again)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _point_stdout_at_devnull()


def _point_stdout_at_devnull() -> None:
    """Point standard output's file descriptor at ``os.devnull``: the flush at exit then writes nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _stdout_closed() -> bool:
    """Whether standard output's reader is gone: ``poll`` reports ``POLLERR`` on the write end of a pipe whose read
    end was closed. ``True`` where that cannot be told (no ``poll``, a standard output without a file descriptor)."""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv`` (default: ``sys.argv[1:]``) to the command it names; on a closed standard output, exit
    quietly with status 141 (``quiet_on_closed_pipe``)."""
    quiet_on_closed_pipe(lambda: _dispatch(argv))


def _dispatch(argv: list[str] | None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = parser()
    if not argv:
        top.print_help(sys.stdout)
        raise SystemExit(2)
    first = argv[0]
    if first.startswith("-"):
        top.parse_args(argv)  # -h/--help and --version exit 0, anything else is an error (exit 2)
    if first not in COMMANDS:
        print(_unknown(first), file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[first][0])
    result = module.main(argv[1:], prog=f"{PROG} {first}")
    if first == "compare" and any(not row["pass"] for row in result or []):  # scripts can tell from the exit code
        failing = ", ".join(f"{row['backend']} {row['dtype']}" for row in result if not row["pass"])
        print(f"{PROG} compare: outside tolerance: {failing} (exit status 1)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
