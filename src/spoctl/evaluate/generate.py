"""Responses of the base model and of each stage's model to each dimension's held-out prompts.

Which prompts: a seeded sample of `num_prompts` distinct prompts of the dimension's eval split (all of them when
it has fewer). `spoctl prepare` holds out prompts by a seeded hash, but keeps the rows in source order, and many
sources are ordered (by topic, by date, by how they were collected): the first N rows would describe the start of
the file, not the split. The sample ranks each row by a hash of the seed and its pair id, so it does not depend on
row order, and a larger N keeps every prompt a smaller one chose.

Prompts are the eval split's `prompt_input_ids` (already rendered with the chat template and ending with the
generation prompt), left-padded into batches. Sampling is seeded per (dimension, batch) -- not per model -- so
every model draws with the same random stream and the only difference between their responses is the model;
the same settings give the same responses on the same hardware.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any, Sequence

import torch

from ..config import GenerationSettings
from .judges.base import last_user_text, parse_messages
from .runinfo import EvalRun


def seeded_sample(ids: Sequence[str], n: int, seed: int, *, keys: Sequence[Any] | None = None) -> list[int]:
    """Indices (ascending) of `n` rows chosen by the rank of sha256(seed, id): a seeded sample that does not
    depend on row order. With `keys`, rows sharing a key count once (the best-ranked one is kept)."""
    ranked = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}\0{ids[i]}".encode()).hexdigest())
    chosen, seen = [], set()
    for i in ranked:
        if len(chosen) >= n:
            break
        key = None if keys is None else keys[i]
        if key is not None and key in seen:
            continue
        seen.add(key)
        chosen.append(i)
    return sorted(chosen)


def prompt_rows(er: EvalRun, dim: str, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` distinct prompts of `dim`'s eval split (see the module docstring), in the split's order; `index` is
    the row's index in the split."""
    ds = er.prepared.split(dim, "eval")
    keys = [tuple(p) for p in ds["prompt_input_ids"]]
    index = seeded_sample(ds["pair_id"], n, seed, keys=keys)
    rows = ds.select(index)
    return [{"index": i, "pair_id": r["pair_id"], "prompt_input_ids": r["prompt_input_ids"],
             "prompt": last_user_text(r["prompt_messages"], r["prompt"]),
             "messages": parse_messages(r["prompt_messages"]),
             "chosen": r["chosen"], "rejected": r["rejected"]} for i, r in zip(index, rows)]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask with every row right-aligned, so that each prompt ends where generation
    begins."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(model: Any, tokenizer: Any, prompts: list[list[int]], gen: GenerationSettings, seed: int,
                   device: torch.device | None = None) -> list[str]:
    """One response per prompt (token ids), decoded up to the first end-of-sequence token, special tokens
    dropped. `temperature` 0 decodes greedily (and `seed` then changes nothing)."""
    from transformers import GenerationConfig

    device = device if device is not None else next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    sample = gen.temperature > 0
    config = GenerationConfig(max_new_tokens=gen.max_new_tokens, do_sample=sample,
                              temperature=gen.temperature if sample else None, top_p=gen.top_p if sample else None,
                              top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    texts = []
    for row in out[:, ids.shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def batch_seed(seed: int, dim: str, start: int) -> int:
    # zlib.crc32, not hash(): Python salts str hashes per process, which would break reproducibility.
    return seed * 1_000_003 + zlib.crc32(dim.encode()) + start


def generate_for_model(er: EvalRun, model: Any, k: int, rows: dict[str, list[dict[str, Any]]],
                       gen: GenerationSettings, device: torch.device) -> list[dict[str, Any]]:
    """pi_k's responses to `rows[dim]` (from `prompt_rows`), one sample dict per prompt:
    {k, model, dim, index, pair_id, prompt, messages, response}."""
    samples: list[dict[str, Any]] = []
    for d, dim_rows in rows.items():
        for start in range(0, len(dim_rows), gen.batch_size):
            batch = dim_rows[start:start + gen.batch_size]
            texts = generate_batch(model, er.tokenizer, [r["prompt_input_ids"] for r in batch], gen,
                                   batch_seed(gen.seed, d, start), device)
            for r, text in zip(batch, texts):
                samples.append({"k": k, "model": er.generator(k), "dim": d, "index": r["index"],
                                "pair_id": r["pair_id"], "prompt": r["prompt"], "messages": list(r["messages"]),
                                "response": text})
    return samples
