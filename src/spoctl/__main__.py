"""`python -m spoctl ...` (what `accelerate launch -m spoctl` and `torchrun -m spoctl` run)."""

from .cli import main

main()
