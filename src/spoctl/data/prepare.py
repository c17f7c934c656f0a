"""`spoctl prepare`: raw preference data -> per-dimension, tokenized, cleaned, split datasets plus a manifest.

Order of work, cheapest checks first so that bad input fails in seconds:
  1. every SOURCE is resolved and `--out` is checked (writable, replaceable with --force, not being read) and
     locked; source files are checked against the size limit;
  2. every source is read once, validated and converted to pairs (errors name file, line/record, field);
  3. the tokenizer is loaded (slow for GGUF files) and each dimension is rendered, length-fitted, de-duplicated,
     capped and split (spoctl.data.build);
  4. everything is written to a temporary folder that is renamed to --out only when complete; leftovers of
     crashed earlier runs for the same --out are then removed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import PrepareConfig
from ..console import Output
from ..errors import UsageError
from ..fsutil import write_json_atomic
from . import outdir
from .build import Built, build_dim
from .reading import limits_of, read_all
from .render import Renderer
from .sources import check_size, resolve_source
from .store import COLUMNS, FORMAT_VERSION, PREPARED_MANIFEST, features, file_records

DEBUG_EXAMPLES = 3


def prepare(cfg: PrepareConfig, out: Output, debug: bool = False) -> dict[str, Any]:
    """Run the whole preparation; returns the JSON-able summary printed by `--json`."""
    if not cfg.model:
        raise UsageError(
            "no model given: pass --model (a Hugging Face folder, a .gguf file or a Hub id) so that prompts are"
            " rendered with that model's tokenizer and chat template"
        )
    if not cfg.data:
        raise UsageError("no data given: pass --data DIM=SOURCE (repeatable) or set prepare.data in --config")
    out_dir = Path(cfg.out)
    sources = {label: resolve_source(spec, label) for label, spec in cfg.data.items()}
    replace, old = outdir.claim(out_dir, cfg.force, outdir.source_paths(sources.values()))
    try:
        for source in sources.values():
            check_size(source, limits_of(cfg))
        dims = read_all(cfg, sources, out)

        from ..models import load_tokenizer, resolve_model_source, tokenizer_identity

        out.info(f"loading tokenizer from {cfg.model}")
        tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        renderer = Renderer(tok, cfg.model, cfg.system_prompt)
        if not renderer.has_template:
            out.warn(f"'{cfg.model}' has no chat template: prompts are rendered as plain '\\n\\nHuman: ... \\n\\nAssistant:' text")
        built = [build_dim(dim, s, renderer, cfg, out) for dim, s in dims.items()]

        model_src = resolve_model_source(cfg.model)
        manifest = {
            "format_version": FORMAT_VERSION,
            "spoctl_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # Local models are stored as absolute paths so `align` can find them from any working directory.
            "model": cfg.model if model_src.kind == "hub" else str(Path(cfg.model).expanduser().resolve()),
            "tokenizer": tokenizer_identity(tok, cfg.model),
            "chat_template": renderer.has_template,
            "columns": list(COLUMNS),
            "config": cfg.model_dump(mode="json"),
            "dimensions": {b.dim: b.info for b in built},
        }
        write_prepared(out_dir, built, manifest, replace)
    finally:
        if old is not None:
            old.release()
    for leftover in outdir.clean_stale_temps(out_dir):
        out.detail(f"removed {leftover}, left by an earlier prepare that did not finish")
    report(out, out_dir, built, renderer, debug)
    return {
        "out": str(out_dir),
        "manifest": str(out_dir / PREPARED_MANIFEST),
        "model": manifest["model"],
        "dims": [b.dim for b in built],
        "dimensions": {b.dim: summary(b.info) for b in built},
    }


def summary(info: dict[str, Any]) -> dict[str, Any]:
    """The --json view of one dimension's manifest entry."""
    return {k: info[k] for k in ("source", "format", "counts", "hashes")} | {"mean_tokens": info["tokens"]["total"]["mean"]}


def write_prepared(out_dir: Path, built: list[Built], manifest: dict[str, Any], replace: bool) -> None:
    """Write every split, record its files (bytes, sha256) in the manifest, write the manifest, then put the
    folder in place in one rename."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # keep stdout/stderr to spoctl's own messages
    try:
        with outdir.writing(out_dir, replace) as tmp:
            feats = features()
            for b in built:
                files = {}
                for name, cols in b.splits.items():
                    # An empty split needs num_shards=1, or datasets writes no data file and cannot load it back.
                    shards = 1 if not cols["pair_id"] else None
                    folder = tmp / b.dim / name
                    datasets.Dataset.from_dict(cols, features=feats).save_to_disk(str(folder), num_shards=shards)
                    files[name] = file_records(folder)
                manifest["dimensions"][b.dim]["files"] = files
            write_json_atomic(tmp / PREPARED_MANIFEST, manifest)
    finally:
        if bars:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------- output
def report(out: Output, out_dir: Path, built: list[Built], renderer: Renderer, debug: bool) -> None:
    """The human summary table, drop reasons with --verbose, and rendered examples with --debug."""
    rows = []
    for b in built:
        c = b.info["counts"]
        cut = c["truncation"]
        dropped = sum(c["dropped"].values())
        mean = b.info["tokens"]["total"]["mean"]
        rows.append([b.dim, b.info["format"], c["kept"], c["train"], c["eval"], dropped, c["truncated"],
                     cut["turns_dropped"], cut["messages_cut"], mean])
        if c["dropped"]:
            out.detail(f"{b.dim}: dropped " + ", ".join(f"{n} {why}" for why, n in c["dropped"].items()))
    header = ["dimension", "format", "kept", "train", "eval", "dropped", "truncated", "turns dropped",
              "messages cut", "mean tokens"]
    out.table(f"prepared data in {out_dir}", header, rows)
    if debug:
        for b in built:
            debug_examples(out, b, renderer)


def debug_examples(out: Output, b: Built, renderer: Renderer) -> None:
    """The first train pairs, decoded from the very ids the model will see."""
    train = b.splits["train"]
    for i in range(min(DEBUG_EXAMPLES, len(train["pair_id"]))):
        out.info(f"--- {b.dim} example {i + 1} (pair {train['pair_id'][i][:12]}) ---")
        for col in ("prompt", "chosen", "rejected"):
            ids = train[f"{col}_input_ids"][i]
            out.info(f"{col} ({len(ids)} tokens):")
            text = renderer.decode(ids)
            out.info(_escape(text) if out.is_terminal else text)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
