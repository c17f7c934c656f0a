"""Fault injection for the chaos test: what a crashing machine, a full disk, a flipped bit or a careless script does
to spoctl's files, each followed by the command a user would run next.

Every fault ends with the same assertion, whatever it hit: the next command either exits 0 and its results are
byte-identical to a run that never saw the fault, or it exits 2 with one clear `error:` line (no traceback) and
nothing that was complete before is lost. A SIGTERM or SIGHUP ends the command it hits with its documented exit
code (143, 129) and one `error:` line, leaving no temporary file; `align --resume` then ends identical. `run_faults(n, seed)` draws n faults from FAULTS with a seeded RNG.

A fault that hits a running command hits a real process (kill -9, SIGTERM, SIGHUP, a file-size limit); the command a
user runs next, and the command run on files damaged at rest, run in this process (`spoctl_next`): a process start
costs seconds, and what is checked (exit code, stderr, files) is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SPOCTL = [sys.executable, "-m", "spoctl"]
ALIGN_ARGS = ["--dims", "helpful,harmless", "--lr", "1e-3", "--batch-size", "4", "--max-steps", "6",
              "--set", "save_every=2"]


@dataclass
class World:
    """The inputs and the fault-free results every fault is compared with."""

    root: Path
    model: Path
    sources: dict[str, Path]
    prepared: Path  # the reference prepared data (never faulted: faults work on copies)
    run: Path  # the reference run
    # How long each command lasts as a process of its own (seconds, measured in make_world): a fault's random moment
    # is drawn within it, so that it lands while the command runs, whatever the machine's speed.
    lasts: dict[str, float] = field(default_factory=dict)
    counter: list[int] = field(default_factory=lambda: [0])

    def fresh(self, name: str) -> Path:
        self.counter[0] += 1
        return self.root / f"{name}-{self.counter[0]:03d}"

    def prepare_args(self, out: Path) -> list[str]:
        return ["prepare", *[f"--data={d}={p}" for d, p in self.sources.items()], "--model", str(self.model),
                "--out", str(out)]

    def align_args(self, prepared: Path, out: Path) -> list[str]:
        return ["align", "--data", str(prepared), "--out", str(out), *ALIGN_ARGS]


@dataclass
class Outcome:
    fault: str
    command: str
    code: int
    stderr: str
    detail: str = ""


def spoctl(args: list[str], *, fsize: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([*SPOCTL, *args], capture_output=True, text=True, timeout=timeout, preexec_fn=limit,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def spoctl_next(args: list[str]) -> subprocess.CompletedProcess:
    """The command a user runs after a fault, run in this process (CliRunner): its exit code, its stdout and stderr
    apart, and the files it leaves are what a process of its own gives. The fault itself (the kill, the signal, the
    file-size limit) always hits a real process; only what follows runs here, as a process start costs seconds."""
    from typer.testing import CliRunner

    from spoctl.cli import app

    result = CliRunner().invoke(app, args, catch_exceptions=False)
    return subprocess.CompletedProcess([*SPOCTL, *args], result.exit_code, result.stdout, result.stderr)


def spoctl_here(args: list[str]) -> None:
    """A setup command, run in this process: one that must succeed and is not what a fault tests."""
    r = spoctl_next([*args, "--quiet"])
    assert r.returncode == 0, r.stdout + r.stderr


def kill_at_random(args: list[str], rng: random.Random, within_s: float) -> str:
    """kill -9 at a random moment of a spoctl command; says when, and whether the command had ended by then."""
    proc = subprocess.Popen([*SPOCTL, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = rng.uniform(0.05, within_s)
    time.sleep(delay)
    ended = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"killed after {delay:.1f} of ~{within_s:.1f} s" + (" (it had ended)" if ended else "")


def signal_at_random(args: list[str], rng: random.Random, within_s: float,
                     sig: signal.Signals) -> subprocess.CompletedProcess:
    """`sig` (SIGTERM, SIGHUP) at a random moment of a spoctl command; what it printed and how it ended."""
    proc = subprocess.Popen([*SPOCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    delay = rng.uniform(0.05, within_s)
    try:
        out, err = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=600)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result.delay = delay  # type: ignore[attr-defined]
    return result


# Python's own start, before `python -m spoctl` runs a line of spoctl (well under this on an idle machine): a signal
# there ends the interpreter with the default action, nothing having been done.
INTERPRETER_START_S = 0.3


def stopped_cleanly(result: subprocess.CompletedProcess, sig: signal.Signals) -> bool:
    """Finished (exit 0), or stopped by `sig` as documented: exit 128 + its number, one `error:` line naming it, no
    traceback."""
    if result.returncode == 0:
        return True
    if result.returncode == -sig:
        # The default action: no handler yet, so Python was still starting and spoctl had done nothing. Certain
        # within INTERPRETER_START_S; later (a loaded machine starts Python slowly) only if it printed nothing, as
        # every command prints before its first piece of work (and output is unbuffered here).
        return getattr(result, "delay", 1e9) < INTERPRETER_START_S or not (result.stdout or result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return (result.returncode == 128 + sig and len(errors) == 1 and sig.name in errors[0]
            and "Traceback" not in result.stderr)


# ------------------------------------------------------------------------------------------------ comparisons
def tree_digest(folder: Path, *, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not skip(p)}


def stage_weights(run: Path) -> dict[str, str]:
    """sha256 of each stage's saved weights: what 'byte-identical results' means for a run."""
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run / "stages").glob("*/model/*.safetensors"))}


def prepared_content(folder: Path) -> dict[str, str]:
    """The data files of a prepared folder (the manifest holds a creation time, so it is compared by its hashes)."""
    files = tree_digest(folder, skip=lambda p: p.name in ("manifest.json", ".lock") or "cache" in p.parts)
    manifest = json.loads((folder / "manifest.json").read_text())
    files["manifest:hashes"] = json.dumps({d: i["hashes"] for d, i in manifest["dimensions"].items()}, sort_keys=True)
    return files


def clear_error(result: subprocess.CompletedProcess) -> bool:
    """Exit 2 with an `error:` line and no traceback: the message a person can act on."""
    return result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr


def damage(path: Path, rng: random.Random, how: str) -> str:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        cut = rng.randrange(0, max(1, len(data)))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated {path.name} to {cut} of {len(data)} bytes"
    pos = rng.randrange(len(data))
    data[pos] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flipped a bit at byte {pos} of {path.name}"


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ------------------------------------------------------------------------------------------------ the faults
def kill_align(w: World, rng: random.Random) -> Outcome:
    """kill -9 at a random moment of `align`; next: the same command with --resume."""
    out = w.fresh("kill-align")
    when = kill_at_random(w.align_args(w.prepared, out), rng, within_s=w.lasts["align"])
    r = spoctl_next([*w.align_args(w.prepared, out), "--resume"])
    assert r.returncode == 0, r.stderr
    assert stage_weights(out) == stage_weights(w.run), "resumed run differs from the uninterrupted one"
    return Outcome("kill -9 align", "align --resume", r.returncode, r.stderr, when)


def signal_align(w: World, rng: random.Random) -> Outcome:
    """SIGTERM or SIGHUP at a random moment of `align`: a clean stop (inside training, after saving a checkpoint
    and marking the stage interrupted), no temporary file left; next: the command it prints, --resume."""
    out = w.fresh("signal-align")
    sig = rng.choice([signal.SIGTERM, signal.SIGHUP])
    first = signal_at_random(w.align_args(w.prepared, out), rng, sig=sig, within_s=w.lasts["align"])
    assert stopped_cleanly(first, sig), (first.returncode, first.stderr)
    detail = f"{sig.name} after {first.delay:.1f} of ~{w.lasts['align']:.1f} s: exit {first.returncode}"
    if first.returncode and "after step" in first.stderr:  # stopped inside training
        stages = json.loads((out / "manifest.json").read_text())["stages"]
        assert "interrupted" in [st["status"] for st in stages], stages
        assert "--resume" in first.stderr
        detail += ", " + first.stderr.split("stopped by ")[1].split(";")[0]
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))] if out.exists() else True
    r = spoctl_next([*w.align_args(w.prepared, out), "--resume"])
    assert r.returncode == 0, r.stderr
    assert stage_weights(out) == stage_weights(w.run), "resumed run differs from the uninterrupted one"
    return Outcome(f"{sig.name} align", "align --resume", r.returncode, first.stderr, detail)


def signal_eval_export(w: World, rng: random.Random) -> Outcome:
    """SIGTERM or SIGHUP at a random moment of `eval` or `export`: a clean stop, everything that was there before
    as it was (the run, an earlier export), nothing half-written."""
    run = copy_tree(w.run, w.fresh("run"))
    sig = rng.choice([signal.SIGTERM, signal.SIGHUP])
    command = rng.choice(["eval", "export"])
    target = w.fresh("export")
    if command == "eval":
        args = ["eval", str(run), "--no-plot"]
    else:
        args = ["export", "--run", str(run), "--stage", "harmless", "--out", str(target)]
    before = tree_digest(run, skip=lambda p: p.name == ".lock")
    r = signal_at_random(args, rng, sig=sig, within_s=w.lasts[command])
    assert stopped_cleanly(r, sig), (r.returncode, r.stderr)
    after = tree_digest(run, skip=lambda p: p.name == ".lock")
    if r.returncode:  # stopped: nothing earlier changed, nothing half-written
        assert after == before, "a stopped command changed the run"
        assert not target.exists() or not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    else:  # it finished first: it only added its own results
        assert {k: v for k, v in after.items() if k in before} == before
    return Outcome(f"{sig.name} {command}", command, r.returncode, r.stderr,
                   f"after {r.delay:.1f} of ~{w.lasts[command]:.1f} s: exit {r.returncode}")


def kill_prepare(w: World, rng: random.Random) -> Outcome:
    """kill -9 at a random moment of `prepare`; next: the same command again."""
    out = w.fresh("kill-prepare")
    when = kill_at_random(w.prepare_args(out), rng, within_s=w.lasts["prepare"])
    r = spoctl_next(w.prepare_args(out))
    if r.returncode == 0:
        assert prepared_content(out) == prepared_content(w.prepared)
    else:  # the killed one had finished: the rerun refuses to overwrite, and what is there is complete
        assert clear_error(r) and "--force" in r.stderr, r.stderr
        assert prepared_content(out) == prepared_content(w.prepared)
    return Outcome("kill -9 prepare", "prepare", r.returncode, r.stderr, when)


def disk_full_align(w: World, rng: random.Random) -> Outcome:
    """Writes fail past a random size (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC); next: --resume."""
    out = w.fresh("full-align")
    limit = rng.choice([2_000, 20_000, 60_000, 150_000, 400_000])
    first = spoctl(w.align_args(w.prepared, out), fsize=limit)
    assert first.returncode == 0 or clear_error(first), first.stderr
    r = spoctl_next([*w.align_args(w.prepared, out), "--resume"])
    assert r.returncode == 0, r.stderr
    assert stage_weights(out) == stage_weights(w.run)
    return Outcome(f"file-size limit {limit} B during align", "align --resume", r.returncode, first.stderr)


def disk_full_prepare(w: World, rng: random.Random) -> Outcome:
    out = w.fresh("full-prepare")
    limit = rng.choice([1_000, 10_000, 50_000])
    first = spoctl(w.prepare_args(out), fsize=limit)
    assert clear_error(first) or first.returncode == 0, first.stderr
    assert first.returncode == 0 or not out.exists(), "a failed prepare left a partial --out"
    r = spoctl_next(w.prepare_args(out))
    assert r.returncode == 0 or (clear_error(r) and "--force" in r.stderr), r.stderr
    assert prepared_content(out) == prepared_content(w.prepared)
    return Outcome(f"file-size limit {limit} B during prepare", "prepare", r.returncode, first.stderr)


def damaged_prepared(w: World, rng: random.Random) -> Outcome:
    """A prepared split file changed behind spoctl's back; next: align on it. Refused, naming the file."""
    prepared = copy_tree(w.prepared, w.fresh("prepared"))
    target = rng.choice(sorted(p for p in prepared.glob("*/*/*") if p.is_file() and p.suffix == ".arrow"))
    detail = damage(target, rng, rng.choice(["flip", "truncate"]))
    r = spoctl_next(w.align_args(prepared, w.fresh("on-damaged")))
    assert clear_error(r) and target.name in r.stderr, r.stderr
    return Outcome("damaged prepared split", "align", r.returncode, r.stderr, detail)


def damaged_cache(w: World, rng: random.Random) -> Outcome:
    """A frozen log-prob cache file damaged; next: align. Recomputed, same weights."""
    prepared = copy_tree(w.prepared, w.fresh("prepared"))
    target = rng.choice(sorted((prepared / "cache" / "logps").glob("*.safetensors")))
    detail = damage(target, rng, rng.choice(["flip", "truncate"]))
    out = w.fresh("on-cache")
    r = spoctl_next(w.align_args(prepared, out))
    assert r.returncode == 0, r.stderr
    assert stage_weights(out) == stage_weights(w.run)
    return Outcome("damaged log-prob cache", "align", r.returncode, r.stderr, detail)


def damaged_checkpoint(w: World, rng: random.Random) -> Outcome:
    """A run killed in stage 2 with checkpoints, one checkpoint file damaged; next: --resume. Same weights."""
    from tinyworld import checkpoints, kill_when

    out = w.fresh("ckpt")
    proc = subprocess.Popen([*SPOCTL, *w.align_args(w.prepared, out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = out / "stages" / "02-harmless" / "checkpoints"
    kill_when(proc, lambda: bool(checkpoints(ckpts)))
    files = sorted(p for p in ckpts.rglob("*") if p.is_file()) if ckpts.is_dir() else []
    detail = damage(rng.choice(files), rng, rng.choice(["flip", "truncate"])) if files else "no checkpoint yet"
    r = spoctl_next([*w.align_args(w.prepared, out), "--resume"])
    assert r.returncode == 0, r.stderr
    assert stage_weights(out) == stage_weights(w.run)
    return Outcome("damaged checkpoint", "align --resume", r.returncode, r.stderr, detail)


def damaged_stage_model(w: World, rng: random.Random) -> Outcome:
    """A finished stage's model changed behind spoctl's back; next: eval, export, or a resume that needs it."""
    run = copy_tree(w.run, w.fresh("run"))
    target = rng.choice(sorted((run / "stages").glob("*/model/*.safetensors")))
    detail = damage(target, rng, rng.choice(["flip", "truncate"]))
    before = tree_digest(run, skip=lambda p: p == target or p.name == ".lock")
    command = rng.choice(["eval", "export", "resume"])
    if command == "eval":
        r = spoctl_next(["eval", str(run), "--no-plot"])
    elif command == "export":
        r = spoctl_next(["export", "--run", str(run), "--stage", target.parts[-3].split("-", 1)[1], "--out",
                         str(w.fresh("export"))])
    else:
        r = spoctl_next([*w.align_args(w.prepared, run), "--resume", "--dims", "helpful,harmless,concise"])
    assert clear_error(r) and target.name in r.stderr, r.stderr
    after = tree_digest(run, skip=lambda p: p == target or p.name == ".lock" or "eval" in p.relative_to(run).parts)
    assert {k: v for k, v in before.items() if not k.startswith("eval/")} == after, "files were lost or changed"
    return Outcome("changed stage model", command, r.returncode, r.stderr, detail)


def damaged_manifest(w: World, rng: random.Random) -> Outcome:
    run = copy_tree(w.run, w.fresh("run"))
    detail = damage(run / "manifest.json", rng, rng.choice(["flip", "truncate"]))
    before = tree_digest(run, skip=lambda p: p.name == ".lock")
    r = spoctl_next([*w.align_args(w.prepared, run), "--resume"])
    # A flipped bit may land in a value that still parses (a date, a digit): then the run is either still this run
    # (exit 0, same weights) or refused as another; never trained on silently into something else.
    if r.returncode == 0:
        assert stage_weights(run) == stage_weights(w.run)
    else:
        assert clear_error(r), r.stderr
        assert tree_digest(run, skip=lambda p: p.name == ".lock") == before
    return Outcome("damaged run manifest", "align --resume", r.returncode, r.stderr, detail)


def data_replaced(w: World, rng: random.Random) -> Outcome:
    """The prepared data re-made from other sources behind a finished run; next: a resume that adds a stage."""
    prepared = copy_tree(w.prepared, w.fresh("prepared"))
    run = w.fresh("run")
    shutil.copytree(w.run, run, ignore=shutil.ignore_patterns(".lock"))
    shuffled = w.root / f"shuffled-{w.counter[0]}.jsonl"
    lines = w.sources["helpful"].read_text().splitlines()
    rng.shuffle(lines)
    shuffled.write_text("\n".join(lines[: len(lines) - 3]) + "\n")
    args = w.prepare_args(prepared)
    args[1] = f"--data=helpful={shuffled}"
    spoctl_here([*args, "--force"])  # the change behind the run's back (setup, not the command under test)
    r = spoctl_next([*w.align_args(prepared, run), "--resume", "--dims", "helpful,harmless,concise"])
    assert clear_error(r) and "data hash" in r.stderr, r.stderr
    return Outcome("prepared data replaced", "align --resume", r.returncode, r.stderr)


FAULTS: dict[str, Callable[[World, random.Random], Outcome]] = {
    "kill-align": kill_align, "kill-prepare": kill_prepare, "disk-full-align": disk_full_align,
    "disk-full-prepare": disk_full_prepare, "damaged-prepared": damaged_prepared, "damaged-cache": damaged_cache,
    "damaged-checkpoint": damaged_checkpoint, "damaged-stage-model": damaged_stage_model,
    "damaged-manifest": damaged_manifest, "data-replaced": data_replaced, "signal-align": signal_align,
    "signal-eval-export": signal_eval_export,
}


def make_world(root: Path) -> World:
    """Raw pairwise JSONL for three dimensions, a tiny model, the reference prepared data and run."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tinyworld import make_model_dir

    model = make_model_dir(root / "model")
    rng = random.Random(0)
    words = ["red", "blue", "cats", "sing", "the", "river", "quiet", "seven", "maps", "glow", "slowly", "under"]
    sources = {}
    for dim in ("helpful", "harmless", "concise"):
        path = root / f"{dim}.jsonl"
        rows = [{"prompt": " ".join(rng.choices(words, k=rng.randint(3, 8))) + "?",
                 "chosen": " ".join(rng.choices(words, k=rng.randint(2, 7))) + ".",
                 "rejected": " ".join(rng.choices(words, k=rng.randint(2, 7))) + "!"} for _ in range(40)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sources[dim] = path
    w = World(root, model, sources, root / "prepared", root / "reference-run")
    # The reference data and run are made in this process (they are not under test, and a process start costs
    # seconds), then align once more as a real process: the same bytes, and the cost of a process start, which
    # with each command's time in this process gives how long it lasts as a process of its own. (The first command
    # here pays the imports a process pays at its start: a prepare before the timed one, so as not to count them
    # twice. Align's own imports still count in its time here: the other commands' estimates err short, and a
    # moment drawn within them falls while the command runs.)
    spoctl_here(w.prepare_args(root / "warm-up-prepared"))
    in_process = {"prepare": timed(spoctl_here, w.prepare_args(w.prepared)),
                  "align": timed(spoctl_here, w.align_args(w.prepared, w.run))}
    scratch = copy_tree(w.run, root / "timing-run")
    in_process["eval"] = timed(spoctl_here, ["eval", str(scratch), "--no-plot"])
    in_process["export"] = timed(spoctl_here, ["export", "--run", str(scratch), "--stage", "harmless", "--out",
                                               str(root / "timing-export")])
    started = time.perf_counter()
    real = subprocess.run([*SPOCTL, *w.align_args(w.prepared, root / "process-run"), "--quiet"], capture_output=True,
                          text=True, timeout=600)
    w.lasts["align"] = time.perf_counter() - started
    assert real.returncode == 0, real.stderr
    assert stage_weights(root / "process-run") == stage_weights(w.run), "a process and this process trained apart"
    start = max(0.0, w.lasts["align"] - in_process["align"])
    w.lasts.update({cmd: seconds + start for cmd, seconds in in_process.items() if cmd != "align"})
    return w


def timed(command: Callable[[list[str]], None], args: list[str]) -> float:
    started = time.perf_counter()
    command(args)
    return time.perf_counter() - started


def run_faults(w: World, n: int, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    names = sorted(FAULTS)
    # Every kind once before any repeats, in a seeded order, so a small sample still covers the kinds.
    order = rng.sample(names, len(names)) + [rng.choice(names) for _ in range(max(0, n - len(names)))]
    return [FAULTS[name](w, random.Random(rng.random())) for name in order[:n]]
