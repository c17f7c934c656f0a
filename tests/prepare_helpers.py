"""Small helpers shared by the prepare test modules: write a JSONL file, run `spoctl prepare` in-process or in a
fresh process, and list what prepare left next to --out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from spoctl.cli import app

runner = CliRunner()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"Question {tag}{i}: how do I do thing {i}?", "chosen": f"Carefully, step {i}.",
             "rejected": f"No idea {i}."} for i in range(n)]


def run_prepare(tok: Path, out: Path, *args: str):
    """`spoctl prepare --model tok --out out ...` in this process (CliRunner)."""
    return runner.invoke(app, ["prepare", "--model", str(tok), "--out", str(out), *args])


def cli_process(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
                preexec_fn=None) -> subprocess.CompletedProcess:
    """`spoctl ARGS` in a fresh Python process (for real locks, crashes, resource limits and FIFOs)."""
    return subprocess.run([sys.executable, "-c", "from spoctl.cli import main; main()", *args], capture_output=True,
                          text=True, env=env or dict(os.environ), timeout=timeout, preexec_fn=preexec_fn)


def siblings(out: Path) -> list[str]:
    """What is at --out and next to it that prepare may have made (its hidden temporary folders start with .NAME.)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))
