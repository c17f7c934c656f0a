"""The suite must pass on any x86 CPU, not only this one. Different CPUs run different kernels (AVX-512, AVX2,
plain SSE), which sum in different orders and so round differently; a comparison tuned to one CPU's rounding fails
on another (it did: an AVX-512 machine failed a weight comparison that passed here).

PyTorch picks its kernels by ATEN_CPU_CAPABILITY and MKL by MKL_ENABLE_INSTRUCTIONS, so the tests whose assertions
are about rounding (layouts, kernels, process splits) are run again here in a subprocess with the kernels of
other CPUs. A capability above what this CPU has is ignored by PyTorch, so "default" (no vector units) and "avx2"
are what every x86 CPU can run. The sessions for the CPUs run side by side.

A session whose kernels are this CPU's own is not started: on a CPU with AVX2 and nothing above it (no AVX-512, no
AVX-VNNI, no AMX), "avx2" is what PyTorch and MKL pick anyway, so the session would repeat, kernel for kernel, what
`make test` runs in its own session. Its case is then a skip that says so (it runs on an AVX-512 CPU, where its
kernels differ).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import warm
from test_engine_align import _env

ROOT = Path(__file__).resolve().parents[1]
ROUNDING_TESTS = [
    "tests/test_engine_logprobs.py",
    "tests/test_engine_align.py::test_attention_and_layout_settings_change_rounding_only",
    "tests/test_distributed_runs.py::test_ddp_on_two_processes_trains_what_one_process_trains",
    "tests/test_distributed_runs.py::test_fsdp_on_two_processes_trains_what_one_process_trains[full]",
    "tests/test_engine_invariants.py::test_demo_first_steps_match_the_pinned_reference",
    "tests/test_engine_invariants.py::test_the_first_logged_loss_is_the_loss_at_zero_margin",
]
OTHER_CPUS = {
    "no-vector-units": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


# Instruction sets above AVX2 that MKL dispatches to (AVX2_E1 is AVX-VNNI; then AVX-512 and AMX): a CPU without any of
# them runs MKL_ENABLE_INSTRUCTIONS=AVX2's kernels whether or not the variable is set.
ABOVE_AVX2 = ("avx512", "avx_vnni", "amx")


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags (Linux /proc/cpuinfo), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else None


def own_kernels(kernels: dict[str, str]) -> bool:
    """True when `kernels` are the ones this CPU picks with no setting: `make test` runs the tests with them already."""
    flags = cpu_flags()
    return (flags is not None and kernels["ATEN_CPU_CAPABILITY"].upper() == torch.backends.cpu.get_cpu_capability()
            and kernels["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"
            and not any(f.startswith(ABOVE_AVX2) for f in flags))


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path]]:
    """One pytest session per other CPU, all started at once: each runs on one thread (conftest), so on a 2-core
    machine they take a core each instead of queueing (the tests run one after the other inside a session).
    Output goes to a file (a full pipe would stall a session while the other one is waited for)."""
    started = {}
    for cpu, kernels in sorted(OTHER_CPUS.items()):
        if own_kernels(kernels):
            continue
        folder = tmp_path_factory.mktemp(f"cpu-{cpu}")
        with open(folder / "output.txt", "w") as out:
            # Warm (tests/warm.py): the session and its launches share one server, which imports with these kernels'
            # variables (the environment its launches get, tests/test_engine_align.py's _env, so one server serves all).
            started[cpu] = (subprocess.Popen(
                [*warm.python_cmd("-m", "pytest"), "-q", "-x", "-p", "no:cacheprovider",
                 f"--basetemp={folder / 'tmp'}", *ROUNDING_TESTS], cwd=ROOT, env={**_env(), **kernels}, stdout=out,
                stderr=subprocess.STDOUT), folder / "output.txt")
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("cpu", sorted(OTHER_CPUS))
def test_rounding_comparisons_hold_with_another_cpus_kernels(sessions, cpu):
    if cpu not in sessions:
        pytest.skip(f"{OTHER_CPUS[cpu]} are this CPU's own kernels (PyTorch: {torch.backends.cpu.get_cpu_capability()},"
                    " nothing above AVX2): the suite runs these tests with them where it runs their files")
    proc, output = sessions[cpu]
    proc.wait(timeout=1800)
    text = output.read_text()
    assert proc.returncode == 0, f"with {OTHER_CPUS[cpu]}:\n{text[-14000:]}"
    assert " passed" in text and "skipped" not in text.splitlines()[-1], text[-2000:]
