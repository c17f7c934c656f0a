"""Opt-in metric sinks beside the run's own metrics.jsonl: TensorBoard and Weights & Biases (`report_to`)."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..rundir import RunDir


class MetricSinks:
    """Forwards every numeric metric record to the sinks the user asked for; does nothing when none."""

    def __init__(self, report_to: list[str], run: RunDir, config: dict[str, Any]):
        self._tb: Any = None
        self._wandb: Any = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("report_to: tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(run.tensorboard_dir))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise UsageError("report_to: wandb needs the wandb package: pip install wandb"
                                 " (WANDB_MODE=offline works without a network)") from None
            # Credentials come from the environment (WANDB_API_KEY) only; nothing secret is in `config`.
            self._wandb = wandb.init(name=run.root.name, dir=str(run.root), config=config, resume="allow",
                                     id=f"spoctl-{config.get('run_key', run.root.name)}")

    def log(self, record: dict[str, Any], step: int) -> None:
        scalars = {k: v for k, v in record.items() if "/" in k and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=step)
        if self._wandb is not None:
            self._wandb.log(scalars)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
