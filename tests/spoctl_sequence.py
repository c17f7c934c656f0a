"""Several spoctl commands in one process, one after another: under torchrun, one launch pays the imports and the
process group once for all of them (tests/test_resume_matrix.py runs a dozen two-process runs this way).

    python -m torch.distributed.run ... tests/spoctl_sequence.py COMMANDS.json EXIT_CODES.json

COMMANDS.json: a list of argument lists (what follows `spoctl`). The main process writes each command's exit code
to EXIT_CODES.json, in order. A SIGTERM or SIGHUP that arrives between two commands is ignored (a test that
signals a command may signal it just after it ended); during a command spoctl's own handling applies.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def main() -> None:
    from spoctl.cli.common import app

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    commands = json.loads(open(sys.argv[1], encoding="utf-8").read())
    codes = []
    for args in commands:
        try:
            app(args, prog_name="spoctl")
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        codes.append(code)
        if os.environ.get("RANK", "0") == "0":
            with open(sys.argv[2], "w", encoding="utf-8") as f:
                json.dump(codes, f)
        print(f"spoctl_sequence: {' '.join(args[:1])} -> exit {code}", flush=True)
    import torch.distributed as dist

    if dist.is_initialized():  # as spoctl.cli.main leaves a process group (see _leave_process_group)
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
