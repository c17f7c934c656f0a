"""`spoctl export`."""

from __future__ import annotations

from ..config import ExportConfig
from .common import CommonOptions, command, execute
from .flags import Flag

EXPORT_FLAGS = [
    Flag("run", ("--run", "-r")),
    Flag("stage", ("--stage",)),
    Flag("out", ("--out", "-o")),
    Flag("adapter_only", ("--adapter-only",), "on"),
    Flag("max_shard_size", ("--max-shard-size",), metavar="SIZE"),
    Flag("dtype", ("--dtype",)),
    Flag("push_to_hub", ("--push-to-hub",), metavar="OWNER/NAME"),
    Flag("force", ("--force",), "on"),
]


@command(config=ExportConfig, flags=EXPORT_FLAGS, examples=[
    "spoctl export --run runs/hh --out exports/hh",
    "spoctl export --run runs/hh --stage helpful --out exports/hh-stage1 --dtype fp32",
    "spoctl export --run runs/hh --adapter-only --out exports/hh-adapters",
    "spoctl export --run runs/hh --out exports/hh --push-to-hub me/smollm2-hh   # after `hf auth login`",
])
def export(*, opts: CommonOptions) -> None:
    """Write one stage of a run as a standalone Hugging Face model folder, checked against the checkpoint."""
    out = opts.output

    def act(cfg: ExportConfig) -> dict:
        from ..export import export_model

        return export_model(cfg, out)

    execute(opts, lambda: opts.resolve(ExportConfig, "export"), "export", act)
