"""The chaos test: faults injected at random (kill -9, SIGTERM and SIGHUP at random moments, a full disk, bit flips
and truncations of every kind of artifact, files changed behind spoctl's back), each followed by the command a user
would run next. The assertion is always the same: exit 0 with byte-identical results, or a documented exit (2 for a
fault, 143 or 129 for a signal) with a clear message and nothing lost (tests/chaos.py).

CI runs a fixed sample: every kind of fault once (12 faults), seed 20261130. `make chaos` runs a larger one
(SPOCTL_CHAOS_FAULTS=60 and a fresh seed, printed so a failure can be replayed with SPOCTL_CHAOS_SEED).
"""

from __future__ import annotations

import os

import pytest

from chaos import FAULTS, make_world, run_faults

FAULT_COUNT = int(os.environ.get("SPOCTL_CHAOS_FAULTS", len(FAULTS)))
SEED = int(os.environ.get("SPOCTL_CHAOS_SEED", "20261130"))


@pytest.mark.slow
def test_every_fault_ends_in_identical_results_or_a_clear_error(tmp_path_factory):
    world = make_world(tmp_path_factory.mktemp("chaos"))
    print(f"\nchaos: {FAULT_COUNT} faults, seed {SEED}; each command as a process lasts about "
          + ", ".join(f"{cmd} {seconds:.1f} s" for cmd, seconds in sorted(world.lasts.items())))
    for outcome in run_faults(world, FAULT_COUNT, SEED):
        print(f"  {outcome.fault:40s} -> {outcome.command:15s} exit {outcome.code}  {outcome.detail}")
