"""Progress of a stage: a rich progress bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import time
from typing import Any

from ..console import Output


class StageProgress:
    def __init__(self, out: Output, label: str, *, enabled: bool = True, plain_every_s: float = 10.0):
        self.out, self.label, self.enabled = out, label, enabled and not out.quiet
        self.plain_every_s = plain_every_s
        self._bar: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()
        self._last_plain = 0.0
        self._keep: dict[str, float] = {}  # --keep: the latest constraint values, measured only every K steps

    def __enter__(self) -> "StageProgress":
        if self.enabled and self.out.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                                 console=self.out.console, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=None, stats="")
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._keep.update({k: v for k, v in metrics.items() if "/keep/" in k})
        stats = _stats(metrics) + _keep_stats(self._keep)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, total=total, stats=stats)
            return
        now = time.perf_counter()
        if step == total or step == 1 or now - self._last_plain >= self.plain_every_s:
            self._last_plain = now
            elapsed = now - self._t0
            eta = elapsed / max(step, 1) * (total - step)
            self.out.info(f"{self.label} step {step}/{total} {stats} elapsed {elapsed:.0f}s eta {eta:.0f}s")


def _stats(metrics: dict[str, float]) -> str:
    def find(suffix: str) -> float | None:
        return next((v for k, v in metrics.items() if k.endswith(suffix)), None)

    parts = []
    for label, suffix, fmt in (("loss", "/loss", "{:.4f}"), ("acc", "/rewards/accuracies", "{:.2f}"),
                               ("tok/s", "/tokens_per_second", "{:.0f}")):
        v = find(suffix)
        if v is not None:
            parts.append(f"{label} {fmt.format(v)}")
    return " ".join(parts)


def _keep_stats(latest: dict[str, float]) -> str:
    """' keep helpful 1.02>=0.95 mu 0.4' per kept dimension (margin vs its bound, multiplier), or ''."""
    parts = []
    for key, mu in latest.items():
        if key.endswith("/keep/multiplier"):
            p = key.removesuffix("multiplier")
            dim = p.split("/")[1]
            margin, bound = latest.get(p + "margin"), latest.get(p + "threshold")
            shown = f"{margin:.3g}{'>=' if margin >= bound else '<'}{bound:.3g} " if margin is not None else ""
            parts.append(f" keep {dim} {shown}mu {mu:.2g}")
    return "".join(parts)
