"""How the multi-process test workers end: Python's exit handlers run (a manager's close,
torch's own), then the process leaves without C++ static destructors. With torch 2.15, a
process that used gloo collectives sometimes aborts in one of those at interpreter exit
("terminate called without an active exception": a thread still joinable), after every
check passed (seen in CI in dcp_worker and hf_worker)."""

import atexit
import os
import sys


def leave() -> None:
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
