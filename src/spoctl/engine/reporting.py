"""Experiment trackers (`align.report_to`) through accelerate's tracking: TensorBoard, Weights & Biases, MLflow,
trackio, Comet, Aim, ClearML, DVCLive, SwanLab -- whatever the installed accelerate supports. The run's own
metrics.jsonl is written whatever the trackers (rundir.RunDir.append_metrics).

Trackers are set up by accelerate on the main process; spoctl only names the run, points local trackers into the
run directory and checks, before anything is written, that each tracker's package is installed.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import UsageError
from ..rundir import RunDir

PROJECT = "spoctl"
# The package to install for each tracker accelerate knows (its `LoggerType` names).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def known_trackers() -> list[str]:
    """Every tracker name accelerate accepts for `log_with` (whether or not its package is installed)."""
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType if t.value != "all"]


def check_trackers(names: list[str]) -> None:
    """Fail before any work when a tracker's package is missing (not after the frozen passes). Its name was checked
    by the configuration (`config.AlignConfig.report_to`)."""
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            extra = " (WANDB_MODE=offline works without a network)" if name == "wandb" else ""
            raise UsageError(f"report_to: {name} needs the {PACKAGES.get(name, name)} package: pip install "
                             f"{PACKAGES.get(name, name)}{extra}")


def start_trackers(accelerator: Any, names: list[str], run: RunDir, run_key: str, config: dict[str, Any]) -> None:
    """Start the trackers of `accelerator` (made with `log_with=names`) for this run, with its configuration.

    Local trackers write inside the run directory (TensorBoard and Aim under `trackers/`, MLflow to
    `trackers/mlruns` unless MLFLOW_TRACKING_URI is set), so a run directory is complete in itself. Runs are named
    after the run directory; W&B resumes the same run on `--resume` (its id is the run key)."""
    if not names:
        return
    accelerator.project_configuration.set_directories(str(run.trackers_dir))
    accelerator.project_configuration.logging_dir = str(run.trackers_dir)
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        # MLflow's own default is a store in the current directory; keep the run directory complete instead. Its
        # file store is what works without a database package (MLflow 3 asks for this opt-in to use it). MLflow
        # reads both from the environment while it logs; finish_trackers puts the environment back.
        run.trackers_dir.mkdir(parents=True, exist_ok=True)
        _set_env(accelerator, MLFLOW_TRACKING_URI=(run.trackers_dir / "mlruns").resolve().as_uri(),
                 MLFLOW_ALLOW_FILE_STORE=os.environ.get("MLFLOW_ALLOW_FILE_STORE", "true"))
    name = run.root.name
    init_kwargs = {"wandb": {"name": name, "id": f"spoctl-{run_key}", "resume": "allow", "dir": str(run.root)},
                   "mlflow": {"run_name": name}, "trackio": {"name": name}}
    try:
        accelerator.init_trackers(PROJECT, config=_flat(config), init_kwargs={k: v for k, v in init_kwargs.items()
                                                                               if k in names})
    except Exception as err:  # noqa: BLE001 - any tracker's own refusal (its store, its login, its environment)
        # A tracker that cannot start is the user's setting or environment (MLflow 3 refuses a file: store without
        # MLFLOW_ALLOW_FILE_STORE, W&B without a login): say which tracker and what it said, exit 2. accelerate
        # starts them in order, so the first named one not among its started trackers is the one that failed.
        started = {getattr(t, "name", None) for t in getattr(accelerator, "trackers", [])}
        failed = next((n for n in names if n not in started), ", ".join(names))
        said = re.sub(r"//[^/@\s]+@", "//***@", f"{type(err).__name__}: {err}")  # no credentials of a store URI
        raise UsageError(f"report_to: the {failed} tracker could not start: {said}. Fix its settings or environment,"
                         f" or leave it out of --report-to") from None


def _set_env(accelerator: Any, **values: str) -> None:
    saved = getattr(accelerator, "_spoctl_saved_env", {})
    for key, value in values.items():
        saved.setdefault(key, os.environ.get(key))
        os.environ[key] = value
    accelerator._spoctl_saved_env = saved


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested configuration as flat `a.b` keys with scalar values, which every tracker's hparams accept."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def log_metrics(accelerator: Any, record: dict[str, Any], step: int) -> None:
    """Numeric metrics (keys like `stage2/harmless/rewards/accuracies`) to every tracker, at the stage's step."""
    scalars = {k: v for k, v in record.items() if "/" in k and isinstance(v, (int, float))}
    if scalars and accelerator.trackers:
        accelerator.log(scalars, step=step)


def finish_trackers(accelerator: Any) -> None:
    """Close every tracker (flushes TensorBoard events, ends the W&B/MLflow run). Not `accelerator.end_training()`,
    which also tears down the process group that the rest of the command may still use."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
    for key, value in getattr(accelerator, "_spoctl_saved_env", {}).items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    accelerator._spoctl_saved_env = {}
