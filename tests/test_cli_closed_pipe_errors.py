"""A command's own error, piped to a reader that left (``trak-core compare | head -1``): its message and exit status,
not the closed pipe's 141. Driven as a user drives it, in a subprocess whose standard output's reader is gone, with
Python's standard output block-buffered as in a shell (``closed_pipe_run(..., buffered=True)``)."""
from __future__ import annotations

import sys

import pytest

from test_cli import closed_pipe_run
from trak_core import cli

#: commands that print a little (buffered, not yet written) and then end as named
ENDINGS = {
    "an exception": ("def run():\n    print('half a report')\n    raise ValueError('the store is damaged')\n",
                     1, "ValueError: the store is damaged"),
    "exit status 3": ("def run():\n    print('half a report')\n    raise SystemExit(3)\n", 3, ""),
    "exit with a message": ("def run():\n    print('half a report')\n    raise SystemExit('no store at /x')\n",
                            1, "no store at /x"),
    "success": ("def run():\n    print('all of the report')\n", cli.CLOSED_PIPE_STATUS, ""),
    "exit status 0": ("def run():\n    print('all of the report')\n    raise SystemExit(0)\n",
                      cli.CLOSED_PIPE_STATUS, ""),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_a_command_s_own_error_outlives_a_closed_pipe(ending):
    """A command that printed (buffered) and then failed, with standard output's reader gone: the flush after it
    raised BrokenPipeError, which replaced the command's error: exit 141, nothing on standard error. Now the
    command's own message and status come out; only a command that ended well is 141."""
    body, status, message = ENDINGS[ending]
    code = f"from trak_core.cli import quiet_on_closed_pipe\n{body}quiet_on_closed_pipe(run)"
    done = closed_pipe_run([sys.executable, "-c", code], buffered=True)
    assert done.returncode == status
    assert message in done.stderr and "[Errno 32] Broken pipe" not in done.stderr
    if not message:
        assert done.stderr == ""


FAILING_COMPARE = """\
import trak_core.compare
def main(argv, prog):
    print('backend  dtype  agreement')
    return [{'pass': False, 'backend': 'torch', 'dtype': 'float32'}]
trak_core.compare.main = main
from trak_core.cli import main
main(['compare'])
"""

FAILING_DEMO = """\
import runpy, trak_core.demo
def main():
    print('checkpoint 1 of 5')
    raise MemoryError('out of memory on checkpoint 2')
trak_core.demo.main = main
runpy.run_module('trak_core.demo', run_name='__main__')
"""


@pytest.mark.parametrize("code, status, message", [
    pytest.param(FAILING_COMPARE, 1, "trak-core compare: outside tolerance: torch float32 (exit status 1)\n",
                 id="trak-core compare"),
    pytest.param(FAILING_DEMO, 1, "MemoryError: out of memory on checkpoint 2", id="python -m trak_core.demo"),
])
def test_a_failing_command_piped_to_head_keeps_its_status(code, status, message):
    """``trak-core compare | head -1`` outside tolerance exited 141 (the closed pipe), not 1, so a script's
    ``set -o pipefail`` read a failure as an early reader; ``python -m trak_core.demo | head`` that failed after its
    first line of progress said nothing at all."""
    done = closed_pipe_run([sys.executable, "-c", code], buffered=True)
    assert done.returncode == status and message in done.stderr
    assert "[Errno 32] Broken pipe" not in done.stderr
