"""The run directory: the one module that knows its layout and owns its manifest.

    RUN_DIR/
      manifest.json              the run: identity, base model, data, and each stage's status, models, metrics
      config.yaml                the resolved `align` configuration
      metrics.jsonl              JSON lines, TRL metric names prefixed by stage and dimension
      .lock                      held by the process writing this run
      stages/01-helpful/
        model/                   the stage's final model: HF folder (full weights) or PEFT adapter + lineage
        checkpoints/step-000050/ resumable state within the stage (model, optimizer, scheduler, RNG, position;
                                 one file per process, with checksums)
      cache/logps/               frozen log-probs when the prepared-data folder is not writable
      trackers/                  only with report_to: TensorBoard/Aim logs, MLflow's file store (mlruns/)
      demo-scores.json           only for the built-in demo (`spoctl demo`): rule-judged scores per stage
      eval/                      `spoctl eval`, one folder per evaluation (none is ever replaced):
        latest.json              the pointer: {"latest": ID, "latest_complete": ID or null} (a file, not a link)
        20261206-051500/         one evaluation (ID): report.json, report.md, scores.png, samples.jsonl,
                                 samples.alpaca.json, judge.json (the judge's and generation's settings)
        judge-cache/             judgments keyed by judge, dim and texts, shared by every evaluation
        report.json              runs evaluated before eval history: the one report (read when there is no pointer)

Everything is written atomically (temporary file or folder, then rename), so whatever looks complete is complete.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UsageError
from .fsutil import is_litter, read_json, write_json_atomic, write_text_atomic
from .locks import LOCK_NAME, ExclusiveLock, lock_is_a_folder

RUN_MANIFEST = "manifest.json"
EVAL_POINTER = "latest.json"
MANIFEST_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_EVAL_ID = re.compile(r"^\d{8}-\d{6}(-\d+)?$")


def default_run_dir() -> Path:
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def latest_run(parent: Path | str = "runs") -> Path | None:
    """The most recently updated run directory under `parent` (what `spoctl eval` scores when given none)."""
    parent = Path(parent)
    if not parent.is_dir():
        return None
    runs = [p for p in parent.iterdir() if (p / RUN_MANIFEST).is_file()]
    return max(runs, key=lambda p: (p / RUN_MANIFEST).stat().st_mtime) if runs else None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def demo_home() -> Path:
    """Where the built-in demo caches its base model and prepared data: $SPOCTL_HOME/demo, else runs/.demo-assets
    (beside the runs, so `make clean` removes it too)."""
    home = os.environ.get("SPOCTL_HOME")
    return Path(home).expanduser() / "demo" if home else Path("runs") / ".demo-assets"


def cache_home() -> Path | None:
    """Where spoctl keeps what it can rebuild but is slow to make (GGUF files unpacked to safetensors): $SPOCTL_CACHE,
    else $XDG_CACHE_HOME/spoctl, else ~/.cache/spoctl. None when SPOCTL_CACHE=off (nothing is cached)."""
    explicit = os.environ.get("SPOCTL_CACHE", "").strip()
    if explicit.lower() == "off":
        return None
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "spoctl"


class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    # ---- paths (nobody else builds these) -----------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / RUN_MANIFEST

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def trackers_dir(self) -> Path:
        """Where local experiment trackers (TensorBoard, Aim, MLflow's file store) write."""
        return self.root / "trackers"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def eval_pointer_path(self) -> Path:
        """eval/latest.json: which evaluation is the latest (and the latest complete one)."""
        return self.eval_dir / EVAL_POINTER

    def eval_files(self, eval_id: str) -> "EvalFiles":
        """The files of evaluation `eval_id` (a folder name under eval/, see `new_eval`)."""
        if not _EVAL_ID.match(eval_id):
            raise UsageError(f"{self.eval_pointer_path}: {eval_id!r} is not an evaluation of this run")
        return EvalFiles(self.eval_dir / eval_id, eval_id)

    def new_eval(self) -> "EvalFiles":
        """A new, empty evaluation folder named by the time it starts (a suffix when two start in one second).
        Created here, by the one process writing it, so two evaluations never share a folder."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            files = self.eval_files(stamp if n == 0 else f"{stamp}-{n}")
            try:
                files.root.mkdir()
            except FileExistsError:
                continue
            return files
        raise UsageError(f"{self.eval_dir}: cannot make a new evaluation folder (1000 made in {stamp})")

    def eval_pointer(self) -> dict[str, Any]:
        """{"latest": ID | None, "latest_complete": ID | None}; both None when no evaluation has a pointer."""
        path = self.eval_pointer_path
        if not path.is_file():
            return {"latest": None, "latest_complete": None}
        try:
            pointer = read_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: unreadable ({err}); delete it, or run `spoctl eval` again") from None
        return {"latest": pointer.get("latest"), "latest_complete": pointer.get("latest_complete")}

    def point_to_eval(self, files: "EvalFiles", *, complete: bool) -> None:
        """Make `files` the latest evaluation (and the latest complete one, when it completed): written after
        its report, atomically, so the pointer never names an evaluation without one."""
        pointer = self.eval_pointer()
        pointer["latest"] = files.eval_id
        if complete:
            pointer["latest_complete"] = files.eval_id
        write_json_atomic(self.eval_pointer_path, pointer)

    def latest_eval(self, *, complete: bool = False) -> "EvalFiles | None":
        """The latest evaluation that wrote a report (with `complete`, the latest complete one), by the pointer;
        a run evaluated before eval history has its one report in eval/ itself. None when never evaluated."""
        eval_id = self.eval_pointer()["latest_complete" if complete else "latest"]
        if eval_id is not None:
            return self.eval_files(eval_id)
        legacy = EvalFiles(self.eval_dir, None)
        if legacy.report_path.is_file() and (not complete or _is_complete(legacy.report_path)):
            return legacy
        return None

    @property
    def eval_report_path(self) -> Path:
        """The latest evaluation's report.json (where one would be when the run was never evaluated)."""
        return (self.latest_eval() or EvalFiles(self.eval_dir, None)).report_path

    @property
    def eval_markdown_path(self) -> Path:
        return (self.latest_eval() or EvalFiles(self.eval_dir, None)).markdown_path

    @property
    def eval_plot_path(self) -> Path:
        return (self.latest_eval() or EvalFiles(self.eval_dir, None)).plot_path

    @property
    def eval_samples_path(self) -> Path:
        """The latest evaluation's generated responses."""
        return (self.latest_eval() or EvalFiles(self.eval_dir, None)).samples_path

    @property
    def eval_alpaca_path(self) -> Path:
        return (self.latest_eval() or EvalFiles(self.eval_dir, None)).alpaca_path

    @property
    def judge_cache_dir(self) -> Path:
        """Shared by every evaluation of the run: a judgment asked once is never asked again."""
        return self.eval_dir / "judge-cache"

    @property
    def demo_scores_path(self) -> Path:
        """`spoctl demo`: the rule-judged scores and greedy answers of the base model and each stage."""
        return self.root / "demo-scores.json"

    def stage_dir(self, index: int, dim: str) -> Path:
        return self.root / "stages" / f"{index:02d}-{dim}"

    def stage_model_dir(self, index: int, dim: str) -> Path:
        return self.stage_dir(index, dim) / "model"

    def checkpoints_dir(self, index: int, dim: str) -> Path:
        return self.stage_dir(index, dim) / "checkpoints"

    def checkpoint_dir(self, index: int, dim: str, step: int) -> Path:
        return self.checkpoints_dir(index, dim) / f"step-{step:06d}"

    def checkpoints(self, index: int, dim: str) -> list[tuple[int, Path]]:
        """The stage's step checkpoints, newest first (temporary folders start with '.' and are ignored)."""
        root = self.checkpoints_dir(index, dim)
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    def latest_checkpoint(self, index: int, dim: str) -> tuple[int, Path] | None:
        """The highest step checkpoint."""
        found = self.checkpoints(index, dim)
        return found[0] if found else None

    def lock(self) -> ExclusiveLock:
        return ExclusiveLock(self.root, "run directory")

    def check_usable(self) -> None:
        """Refuse, before writing anything (the lock file included), a --out that cannot become this run directory:
        a file, a path through a file, a folder that cannot be made (no write permission where it would go), a
        lock file that is a folder, or a folder that holds something other than a spoctl run. Reads only, and
        raises what making the folder and its lock would raise, so `spoctl align` can ask it before the model
        libraries load (cli/align.py), as well as just before it locks the folder (engine/runsetup.py)."""
        if str(self.root) in ("", "."):
            raise UsageError("--out: give a folder for the run (e.g. --out runs/hh), not the current directory")
        try:
            # A part of the path that is a file, or a folder that cannot be searched, raises here as mkdir would.
            found = self.root.stat()
        except FileNotFoundError:
            above = next(p for p in self.root.absolute().parents if p.exists())
            if not os.access(above, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.root)) from None
            return
        if not stat.S_ISDIR(found.st_mode):
            raise UsageError(f"{self.root}: exists and is not a folder; choose another --out")
        if (self.root / LOCK_NAME).is_dir():
            raise lock_is_a_folder(self.root / LOCK_NAME)
        if not self.exists():
            other = [p.name for p in self.root.iterdir() if p.name != LOCK_NAME and not is_litter(p.name)]
            if other:
                raise UsageError(f"{self.root}: exists and is not empty ({', '.join(sorted(other)[:3])}"
                                 f"{', ...' if len(other) > 3 else ''}), but is not a spoctl run; choose another --out")

    def discard_contents(self) -> None:
        """Empty the run directory for a new attempt (the caller holds the lock, which stays)."""
        for p in self.root.iterdir():
            if p.name == ".lock":
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    # ---- manifest -----------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            raise UsageError(f"{self.root}: not a spoctl run directory (no {RUN_MANIFEST}); run `spoctl align` first")
        try:
            return read_json(self.manifest_path)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{self.manifest_path}: unreadable manifest ({err})") from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = now_iso()
        write_json_atomic(self.manifest_path, manifest)

    def mark_demo(self, info: dict[str, Any]) -> None:
        """Record that this run is the built-in demo (`manifest["demo"]`); eval then defaults to the rules judge."""
        manifest = self.read_manifest()
        manifest["demo"] = info
        self.write_manifest(manifest)

    def write_config(self, yaml_text: str) -> None:
        write_text_atomic(self.config_path, yaml_text)

    def new_manifest(self, *, run_key: str, dims: list[str], base_model: str, data_dir: str, mode: str,
                     lora: bool, prepared: dict[str, Any]) -> dict[str, Any]:
        return {
            "manifest_version": MANIFEST_VERSION,
            "spoctl_version": __version__,
            "run_key": run_key,
            "created": now_iso(),
            "base_model": base_model,
            "data": data_dir,
            "tokenizer": prepared.get("tokenizer"),
            "mode": mode,
            "lora": lora,
            "dims": dims,
            "stages": self.stage_entries(dims),
        }

    def stage_entries(self, dims: list[str], keep: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The manifest's list of stages for `dims`: an entry of `keep` where it is for the same stage and
        dimension, a pending one otherwise (a stage appended on --resume, or a dimension that changed)."""
        kept = {(st["index"], st["dim"]): st for st in keep or []}
        return [kept.get((i + 1, d)) or {"index": i + 1, "dim": d, "status": "pending",
                                          "dir": str(self.stage_dir(i + 1, d).relative_to(self.root))}
                for i, d in enumerate(dims)]

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON line per logging event; flushed so a crash loses at most the line being written."""
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()

    def truncate_metrics_after(self, stage: int, step: int) -> None:
        """On resume, drop log lines of the current stage written after the checkpoint we resume from."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("stage") == stage and rec.get("step", 0) > step:
                continue
            if rec.get("stage", 0) > stage:
                continue
            kept.append(line)
        write_text_atomic(self.metrics_path, "".join(l + "\n" for l in kept))


def _is_complete(report_path: Path) -> bool:
    try:
        return read_json(report_path).get("complete", True) is True  # only a report that says it stopped is not
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


class EvalFiles:
    """The files of one evaluation (`RunDir.eval_files`, `new_eval`, `latest_eval`). `eval_id` is None for the
    single report of a run evaluated before eval history (its files lie in eval/ itself)."""

    def __init__(self, root: Path, eval_id: str | None):
        self.root, self.eval_id = root, eval_id

    @property
    def report_path(self) -> Path:
        """Everything the evaluation measured, machine-readable."""
        return self.root / "report.json"

    @property
    def markdown_path(self) -> Path:
        return self.root / "report.md"

    @property
    def plot_path(self) -> Path:
        return self.root / "scores.png"

    @property
    def samples_path(self) -> Path:
        """Generated responses, one JSON line per (model, dimension, prompt)."""
        return self.root / "samples.jsonl"

    @property
    def alpaca_path(self) -> Path:
        """The same responses in alpaca_eval's list-of-{instruction, output, generator} form."""
        return self.root / "samples.alpaca.json"

    @property
    def judge_settings_path(self) -> Path:
        """The judge's settings (as it describes itself) and the generation settings the samples were made with."""
        return self.root / "judge.json"
