"""Step 2 of prepare: one dimension's pairs -> cleaned, tokenized, length-fitted, capped and split rows."""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..config import PrepareConfig
from ..console import Output
from ..errors import InputError
from ..fsutil import sha256_file
from . import clean
from .formats import Message, TextPair
from .reading import Sourced
from .render import Fitted, Renderer, fit_length
from .store import COLUMNS, TOKEN_COLUMNS, features, split_hash_rows
from .truncate import fit_prompt

TOKENIZE_CHUNK = 512
HASH_BATCH = 1000
LENGTH_DROPS = ("prompt_too_long", "too_long", "tie_after_truncation")


@dataclass
class Built:
    """One finished dimension: its splits (datasets.Dataset selections of the spooled rows) and its manifest entry."""

    dim: str
    splits: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cuts:
    """What the length policy cut in one dimension (the manifest's counts.truncation)."""

    prompts: int = 0  # pairs whose prompt was shortened
    turns_dropped: int = 0  # whole turns removed from the start of prompts (keep-system-and-recent)
    messages_cut: int = 0  # last user messages whose start was cut (keep-system-and-recent)
    responses: int = 0  # pairs whose responses were cut to fit max_length

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def fit_pair(pair: TextPair, prompt: list[int], chosen: list[int], rejected: list[int], renderer: Renderer,
             cfg: PrepareConfig, cuts: Cuts) -> tuple[Fitted, list[Message]]:
    """Apply the length policy to one tokenized pair, counting what was cut."""
    policy = cfg.length
    messages = renderer.messages(pair.prompt)
    limit = policy.max_prompt_tokens
    fit = None
    if len(prompt) > limit and policy.overflow == "truncate" and policy.prompt_truncation == "keep-system-and-recent":
        fit = fit_prompt(renderer, messages, pair.where, limit)
        if fit.drop:
            return Fitted(prompt, chosen, rejected, drop=fit.drop), messages
        prompt, messages = fit.ids, fit.messages
    long_prompt = len(prompt) > limit  # keep-end: fit_length cuts it
    fitted = fit_length(prompt, chosen, rejected, policy)
    if fitted.drop is None:
        cuts.prompts += fit is not None or long_prompt
        cuts.turns_dropped += fit.turns_dropped if fit else 0
        cuts.messages_cut += fit.message_cut if fit else 0
        cuts.responses += (len(fitted.chosen), len(fitted.rejected)) != (len(chosen), len(rejected))
        fitted.truncated = fitted.truncated or fit is not None
    return fitted, messages


def build_dim(dim: str, s: Sourced, renderer: Renderer, cfg: PrepareConfig, out: Output, spool: Path) -> Built:
    """Clean, tokenize, apply the length policy, cap and split one dimension.

    Tokenized rows go to an Arrow file under `spool` chunk by chunk (token ids are the bulk of prepare's memory as
    Python lists: ~36 bytes a token); what stays in memory per kept pair is its index and four numbers. The splits
    are then index selections of that memory-mapped file, written by `datasets` in batches."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    dropped = Counter(s.pairs.dropped)
    kept = clean.remove_ties_and_duplicates(s.pairs.pairs, dropped)
    order = clean.selection_order([pid for pid, _ in kept], cfg.max_pairs, cfg.seed)
    limit = cfg.max_pairs or len(kept)
    cuts = Cuts()
    meta = Meta()
    path = spool / f"{dim}.arrow"
    capped = cfg.max_pairs is not None and cfg.max_pairs < len(kept)
    # Tokenize in chunks and stop once the cap is met: with --max-pairs only what is needed gets tokenized.
    with ArrowWriter(features=features(), path=str(path)) as writer, \
            out.progress(f"{dim}: tokenizing", total=min(limit, len(order)), unit="pairs") as bar:
        for start in range(0, len(order), TOKENIZE_CHUNK):
            if len(meta) >= limit:
                break
            chunk = [(i, *kept[i]) for i in order[start : start + TOKENIZE_CHUNK]]
            chunk_pairs = [pair for _, _, pair in chunk]
            prompt_ids = renderer.prompt_ids(chunk_pairs)
            chosen_ids = renderer.completion_ids([p.chosen for p in chunk_pairs])
            rejected_ids = renderer.completion_ids([p.rejected for p in chunk_pairs])
            batch: dict[str, list] = {c: [] for c in COLUMNS}
            considered = 0
            for (i, pid, pair), p, c, r in zip(chunk, prompt_ids, chosen_ids, rejected_ids):
                if len(meta) >= limit:
                    break
                considered += 1
                fitted, messages = fit_pair(pair, p, c, r, renderer, cfg, cuts)
                if fitted.drop:
                    dropped[fitted.drop] += 1
                    continue
                meta.add(i, fitted)
                add_row(batch, pid, pair, fitted, messages, renderer)
            if batch["pair_id"]:
                writer.write_batch(batch)
            bar.advance(len(batch["pair_id"]) if capped else considered)
        writer.finalize()
    capped_out = len(kept) - len(meta) - sum(dropped[r] for r in LENGTH_DROPS)
    if capped_out:
        dropped["max_pairs"] += capped_out
    if not len(meta):
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())) or "none"
        raise InputError(
            f"dimension '{dim}' would keep no pairs ({s.pairs.candidates} candidates; dropped: {reasons});"
            " check the format and the length limits (--max-length, --max-prompt-tokens, --overflow)",
            path=s.source.location,
        )
    rows = sorted(range(len(meta)), key=lambda j: meta.index[j])  # spool rows back in file order
    ids = [(kept[meta.index[j]][0], clean.prompt_key(kept[meta.index[j]][1])) for j in rows]
    eval_ids = clean.split_ids(ids, cfg.eval_fraction, cfg.seed)
    if not eval_ids:
        out.warn(f"{dim}: only {len(rows)} pair, so no eval pair is held out")
    per_source = Counter(kept[meta.index[j]][1].where.path for j in rows) if s.parts else None
    held = [pid in eval_ids for pid, _ in ids]
    del kept, ids

    spooled = datasets.Dataset.from_file(str(path))  # memory-mapped
    built = Built(dim)
    # datasets fingerprints a file it reads from its (temporary, random) path: give each split a fingerprint of its
    # content instead, so preparing the same sources twice writes byte-identical folders (state.json included).
    content = sha256_file(path)
    built.splits = {}
    for split, wanted in (("train", False), ("eval", True)):
        chosen = [j for j, h in zip(rows, held) if h == wanted]
        fingerprint = hashlib.sha256(f"{dim}/{split}/{content}/{chosen}".encode()).hexdigest()[:16]
        built.splits[split] = spooled.select(chosen, new_fingerprint=fingerprint)
    built.info = manifest_entry(dim, s, meta, dropped, cuts, len(eval_ids), built.splits, per_source)
    return built


class Meta:
    """What stays in memory per kept pair: its index in the cleaned pairs, its token lengths, whether it was cut."""

    def __init__(self) -> None:
        self.index, self.prompt, self.chosen, self.rejected = array("q"), array("l"), array("l"), array("l")
        self.truncated = 0

    def __len__(self) -> int:
        return len(self.index)

    def add(self, i: int, f: Fitted) -> None:
        self.index.append(i)
        self.prompt.append(len(f.prompt))
        self.chosen.append(len(f.chosen))
        self.rejected.append(len(f.rejected))
        self.truncated += bool(f.truncated)


def add_row(batch: dict[str, list], pid: str, pair: TextPair, fitted: Fitted, messages: list[Message],
            renderer: Renderer) -> None:
    """One kept pair as a row of the split columns (see store.COLUMNS)."""
    batch["pair_id"].append(pid)
    batch["prompt_input_ids"].append(fitted.prompt)
    batch["chosen_input_ids"].append(fitted.chosen)
    batch["rejected_input_ids"].append(fitted.rejected)
    batch["prompt"].append(renderer.decode(fitted.prompt))
    batch["chosen"].append(pair.chosen)
    batch["rejected"].append(pair.rejected)
    batch["prompt_messages"].append(json.dumps(messages, ensure_ascii=False))


def manifest_entry(dim: str, s: Sourced, meta: Meta, dropped: Counter, cuts: Cuts, n_eval: int,
                   splits: dict[str, Any], per_source: Counter | None) -> dict[str, Any]:
    total = [p + max(c, r) for p, c, r in zip(meta.prompt, meta.chosen, meta.rejected)]
    entry = {
        "source": s.source.location if not s.parts else " + ".join(p["source"] for p in s.parts),
        "source_kind": s.source.kind,
        "source_options": s.source.spec.model_dump(exclude_defaults=True, exclude={"source"}),
        "data_key": s.label,
        "format": s.fmt,
        "counts": {
            "read": s.records,
            "candidates": s.pairs.candidates,
            "kept": len(meta),
            "train": len(meta) - n_eval,
            "eval": n_eval,
            "dropped": dict(sorted(dropped.items())),
            "truncated": meta.truncated,
            "truncation": cuts.as_dict(),
        },
        "tokens": {
            "prompt": clean.length_stats(meta.prompt),
            "chosen": clean.length_stats(meta.chosen),
            "rejected": clean.length_stats(meta.rejected),
            "total": clean.length_stats(total),
        },
        "hashes": {"source": s.source_hash, **{name: dataset_split_hash(ds) for name, ds in splits.items()}},
        "source_complete": s.complete,
        "paths": {name: f"{dim}/{name}" for name in ("train", "eval")},
    }
    if s.parts:
        # Several sources mixed into this dimension: what each gave, was sampled, and kept after cleaning.
        entry["sources"] = [{k: v for k, v in p.items() if k != "where"}
                            | {"kept": per_source.get(p["where"], 0) if per_source else 0} for p in s.parts]
    return entry


def dataset_split_hash(ds: Any) -> str:
    """store.split_hash of a split, read in batches (never the whole split as Python lists)."""
    def rows() -> Iterator[tuple]:
        for batch in ds.select_columns(["pair_id", *TOKEN_COLUMNS]).iter(batch_size=HASH_BATCH):
            yield from zip(batch["pair_id"], *(batch[c] for c in TOKEN_COLUMNS))
    return split_hash_rows(rows())
