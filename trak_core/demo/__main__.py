from ..cli import quiet_on_closed_pipe
from . import main

quiet_on_closed_pipe(main)  # python -m trak_core.demo | head: no BrokenPipeError traceback
