"""`python -m spoctl ...` (what `accelerate launch -m spoctl` and `torchrun -m spoctl` run)."""

import sys

from .signals import exit_before_start

exit_before_start(sys.argv[1:])  # before the CLI's imports: a SIGTERM then still ends with an error line

from .cli import main  # noqa: E402

main()
