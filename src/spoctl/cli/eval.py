"""`spoctl eval`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from ..config import EvalConfig, check_gate_bound
from ..evaluate.judges.registry import AUTO
from .common import CommonOptions, command, execute, fail_check
from .flags import Flag


def bare_judge_to_auto(argv: list[str]) -> list[str]:
    """`spoctl eval RUN --judge` (no name) means `--judge auto`. Typer options cannot take an optional value, so
    the console-script entry point rewrites a bare `--judge` (last, or followed by another option) before parsing."""
    if not argv or argv[0] != "eval":
        return argv
    fixed: list[str] = []
    for i, arg in enumerate(argv):
        fixed.append(arg)
        if arg == "--judge" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            fixed.append(AUTO)
    return fixed


def _judge_spec(text: str) -> tuple[str, str | None]:
    from ..evaluate.judges import parse_judge_spec

    return parse_judge_spec(text)


EVAL_FLAGS = [
    Flag("run", ("--run", "-r"), help="The run directory, as an option."),
    Flag("dims", ("--dims",), "list", metavar="DIM,DIM,..."),
    Flag("data", ("--data", "-d")),
    Flag("judge.name", ("--judge",), also=("judge.arg",), convert=_judge_spec, metavar="NAME[:ARG]",
         note=f"A bare --judge means {AUTO}."),
    Flag("judge.models", ("--judge-model",), "pairs", metavar="DIM=PATH", example="helpful=./rm-helpful"),
    Flag("judge.url", ("--judge-url",), metavar="URL"),
    Flag("judge.api_key_env", ("--judge-key-env",), metavar="NAME"),
    Flag("judge.concurrency", ("--judge-concurrency",)),
    Flag("generation.num_prompts", ("--num-prompts",)),
    Flag("generation.max_new_tokens", ("--max-new-tokens",)),
    Flag("generation.temperature", ("--temperature",)),
    Flag("generation.top_p", ("--top-p",)),
    Flag("generation.seed", ("--seed",)),
    Flag("gate.fail_under", ("--fail-under",), "pairs", convert=float, check=check_gate_bound, example="helpful=0.6"),
    Flag("gate.max_regression", ("--max-regression",), "pairs", convert=float, check=check_gate_bound,
         example="helpful=0.05"),
    Flag("gate.allow_incomplete", ("--allow-incomplete",), "on"),
    Flag("plot", ("--no-plot",), "off", help="Skip the PNG plot."),
]


@command(
    "eval", config=EvalConfig, flags=EVAL_FLAGS,
    examples=[
        "spoctl eval runs/hh                                  # implicit-reward scorecard only",
        "spoctl eval runs/hh --judge                          # + judged win rates with the best judge available",
        "spoctl eval runs/hh --judge openai:gpt-4o-mini --judge-url https://api.openai.com/v1",
        "spoctl eval runs/hh --fail-under helpful=0.6 --max-regression helpful=0.05   # CI gate: exit 1 if broken",
    ],
)
def eval_(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory made by spoctl align (default: the latest"
                                             " run under ./runs)."),
    *,
    opts: CommonOptions,
) -> None:
    """Score every stage on every dimension (implicit rewards; judged win rates with --judge); gate CI on it.

    Exit codes: 0 ok, 1 a --fail-under/--max-regression bound is broken (or the gated run is not finished),
    2 usage error, missing run or unreachable judge (the partial report is kept in RUN_DIR/eval/)."""
    out = opts.output

    def build() -> EvalConfig:
        return opts.resolve(EvalConfig, "eval", {"run": str(run_dir) if run_dir else None})

    def act(cfg: EvalConfig) -> dict:
        from ..evaluate import evaluate

        return evaluate(cfg, out)

    report = execute(opts, build, "eval", act)
    if report is not None:
        from ..evaluate.runner import gate_failure

        reason = gate_failure(report)
        if reason:
            fail_check(f"gate: {reason}")
        run, name = shlex.quote(report["run_dir"]), shlex.quote(f"exports/{Path(report['run_dir']).name}")
        out.info(f"next: spoctl compare {run} OTHER_RUN   # against another run on the same held-out pairs\n"
                 f"      spoctl export --run {run} --out {name}   # the final model, for sharing")
