"""`spoctl align`.

With neither `--data` nor `--model` (nor `align.data` / `align.model` from `--config` or `--set`: the options that
name the user's own data and model), `spoctl align` runs the built-in demo (`spoctl.demo.run`), says so, and
`--print-config` shows the demo's settings. `--dims` is not one of them: the demo has dimensions too, and a
dimension it lacks is an error that points to `--data`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..config import AlignConfig
from ..data.store import read_manifest
from ..errors import Interrupted, Stopped
from ..launcher import check_environment, is_main_process
from ..rundir import RunDir
from ..signals import checks_done
from .common import CommonOptions, command, execute
from .flags import Flag

# One line per flag (cli/flags.py): the config key it sets, its option strings; help from the key's description.
ALIGN_FLAGS = [
    Flag("dims", ("--dims",), "list", metavar="DIM,DIM,..."),
    Flag("data", ("--data", "-d"), note="Without --data and --model: the built-in demo."),
    Flag("model", ("--model", "-m"), metavar="MODEL"),
    Flag("out", ("--out", "-o")),
    Flag("mode", ("--mode",)),
    Flag("alpha", ("--alpha",)),
    Flag("weights", ("--weight",), "pairs", metavar="DIM=W", convert=float, example="helpful=0.5"),
    Flag("beta", ("--beta",)),
    Flag("keep", ("--keep",), "pairs", metavar="DIM=FRACTION", convert=float, example="helpful=0.95"),
    Flag("replay", ("--replay",), "pairs", metavar="DIM=SHARE", convert=float, example="helpful=0.2"),
    Flag("lora.enabled", ("--lora/--full",), "toggle"),
    Flag("quantize", ("--quantize",)),
    Flag("learning_rate", ("--lr",)),
    Flag("epochs", ("--epochs",)),
    Flag("batch_size", ("--batch-size",)),
    Flag("max_steps", ("--max-steps",)),
    Flag("seed", ("--seed",)),
    Flag("report_to", ("--report-to",), "list", metavar="TRACKER,..."),
    Flag("resume", ("--resume",), "on"),
]


@command(config=AlignConfig, flags=ALIGN_FLAGS, examples=[
    "spoctl align --dims helpful,harmless --data prepared/ --model ./smollm2 --lora --out runs/hh",
    "spoctl align --dims helpful,harmless --data prepared/ --alpha 0    # sequential DPO baseline",
    "spoctl align --dims helpful,harmless --data prepared/ --keep helpful=0.95   # harmless may cost 5% of helpful",
    "spoctl align --dims helpful,harmless --data prepared/ --out runs/hh --resume",
    "spoctl align --dims helpful,harmless --data prepared/ --lora --quantize 4bit --report-to tensorboard",
    "spoctl align --dims helpful,harmless    # no --data and no --model: the built-in demo",
])
def align(*, opts: CommonOptions) -> None:
    """Run one SPO stage per dimension, in order, checkpointing after each."""
    from ..demo.run import DEMO_VIA_ALIGN, demo_for_align, runs_demo

    out = opts.output

    def build() -> AlignConfig:
        # Without data or model of the user's: the demo's settings, so --print-config shows what will run.
        return demo_for_align(opts.resolve(AlignConfig, "align"))

    def act(cfg: AlignConfig) -> dict:
        _check_paths_first(cfg)
        if runs_demo(cfg):
            from ..demo.run import run_demo

            checks_done()  # the demo's input is its own: nothing more to check before it builds its assets
            out.info(DEMO_VIA_ALIGN)
            return run_demo(out, cfg)
        from ..engine.align import align as run_align

        try:
            return run_align(cfg, out)
        except (Interrupted, Stopped) as err:  # SIGTERM / SIGHUP: what is done is saved; say how to go on
            err = err.as_error() if isinstance(err, Stopped) else err
            again = [*opts.argv, *([] if "--resume" in opts.argv else ["--resume"])]
            raise Interrupted(f"{err}; continue the run with the same command and --resume: "
                              f"{shlex.join(['spoctl', *again])}", err.signum) from None

    result = execute(opts, build, "align", act, header=lambda cfg: DEMO_VIA_ALIGN if runs_demo(cfg) else None,
                     action_checks_more=True)
    if result is not None:
        out.info(f"next: spoctl eval --run {shlex.quote(result['run_dir'])}")


def _check_paths_first(cfg: AlignConfig) -> None:
    """The two paths users mistype most, checked before the engine imports torch and transformers (3-8 s, and the
    demo's assets): a missing or foreign --data folder, and an --out that cannot become the run directory (looked
    at by the main process only: the run directory is its alone). Both only read; the engine checks them again
    where it opens them, so a library caller gets the same errors. The launcher's variables come first, as in the
    engine's checks: which process is the main one depends on them."""
    check_environment()
    if cfg.data is not None:
        read_manifest(Path(cfg.data))
    if cfg.out is not None and is_main_process():
        RunDir(cfg.out).check_usable()
