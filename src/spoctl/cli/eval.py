"""`spoctl eval`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

from ..config import EvalConfig, check_gate_bound
from ..errors import UsageError
from ..evaluate.judges.registry import AUTO, help_text
from .common import CommonOptions, command, execute, fail_check, parse_assignments


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


def gate_bounds(items: list[str] | None, flag: str, example: str) -> dict[str, float] | None:
    """`--fail-under helpful=0.6 ...` -> {dim: bound}; a bound outside [0, 1] (or NaN) is refused by its flag."""
    bounds = parse_assignments(items, flag, example, float)
    for dim, value in (bounds or {}).items():
        try:
            check_gate_bound(value)
        except ValueError as err:
            raise UsageError(f"{flag} {dim}={value}: {err}, e.g. {flag} {example}") from None
    return bounds


@command(
    "eval",
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
    run_opt: Optional[Path] = typer.Option(None, "--run", "-r", help="The run directory, as an option."),
    dims: Optional[str] = typer.Option(None, "--dims", help="Dimensions to evaluate, comma-separated (default: all)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Prepared data (default: the run's)."),
    judge: Optional[str] = typer.Option(None, "--judge", help=help_text()),
    judge_model: Optional[list[str]] = typer.Option(None, "--judge-model", help="reward-model: DIM=PATH (repeatable)."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="openai: base URL of the chat-completions API"
                                            " (credentials in it are used, never printed or saved)."),
    judge_key_env: Optional[str] = typer.Option(None, "--judge-key-env", help="openai: env var with the API key."),
    judge_concurrency: Optional[int] = typer.Option(None, "--judge-concurrency", help="openai: requests at once."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts",
                                              help="Held-out prompts per dimension to generate for (a seeded"
                                              " sample of the eval split's distinct prompts)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Longest generated response."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 0: greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the prompt sample and of sampling."),
    fail_under: Optional[list[str]] = typer.Option(None, "--fail-under", help="Gate: DIM=VALUE (0-1), exit 1 if the"
                                                   " last stage scores lower (repeatable)."),
    max_regression: Optional[list[str]] = typer.Option(None, "--max-regression", help="Gate: DIM=VALUE (0-1), exit 1"
                                                       " if the last stage is more than VALUE below the best stage."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Gate an unfinished run on its completed"
                                          " stages (otherwise the gate fails, naming the missing stage)."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Skip the PNG plot."),
    *,
    opts: CommonOptions,
) -> None:
    """Score every stage on every dimension (implicit rewards; judged win rates with --judge); gate CI on it.

    Exit codes: 0 ok, 1 a --fail-under/--max-regression bound is broken (or the gated run is not finished),
    2 usage error, missing run or unreachable judge (the partial report is kept in RUN_DIR/eval/)."""
    out = opts.output

    def build() -> EvalConfig:
        from ..evaluate.judges import parse_judge_spec

        name, arg = parse_judge_spec(judge) if judge else (None, None)
        flags = {
            "run": str(run_dir or run_opt) if (run_dir or run_opt) else None,
            "dims": [d.strip() for d in dims.split(",") if d.strip()] if dims else None,
            "data": str(data) if data else None,
            "judge.name": name,
            "judge.arg": arg,
            "judge.models": parse_assignments(judge_model, "--judge-model", "helpful=./rm-helpful"),
            "judge.url": judge_url,
            "judge.api_key_env": judge_key_env,
            "judge.concurrency": judge_concurrency,
            "generation.num_prompts": num_prompts,
            "generation.max_new_tokens": max_new_tokens,
            "generation.temperature": temperature,
            "generation.top_p": top_p,
            "generation.seed": seed,
            "gate.fail_under": gate_bounds(fail_under, "--fail-under", "helpful=0.6"),
            "gate.max_regression": gate_bounds(max_regression, "--max-regression", "helpful=0.05"),
            "gate.allow_incomplete": True if allow_incomplete else None,
            "plot": False if no_plot else None,
        }
        return opts.resolve(EvalConfig, "eval", flags)

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
