"""Responses of the base model and of each stage's model to each dimension's held-out prompts.

Which prompts: a seeded sample of `num_prompts` distinct prompts of the dimension's eval split (all of them when
it has fewer). `spoctl prepare` holds out prompts by a seeded hash, but keeps the rows in source order, and many
sources are ordered (by topic, by date, by how they were collected): the first N rows would describe the start of
the file, not the split. The sample ranks each row by a hash of the seed and its pair id, so it does not depend on
row order, and a larger N keeps every prompt a smaller one chose.

Prompts are the eval split's `prompt_input_ids` (already rendered with the chat template and ending with the
generation prompt), sorted by length and left-padded into batches, so a batch holds prompts of similar length and
pads little; `generate` keeps a KV cache, so each new token costs one position's forward, not the whole sequence's.
Decoding is greedy by default (temperature 0): each model's answer is its most likely one, and with exact
arithmetic a prompt's greedy response does not depend on the other prompts of its batch (padding is masked out;
tests/test_eval_generate.py checks that batched and one-at-a-time greedy responses agree token for token). With
a temperature, sampling is seeded per (dimension, batch) -- not per model -- so every model draws with the same
random stream and the only difference between their responses is the model; the same settings give the same
responses on the same hardware.

Backends (`eval.generation.backend`): `transformers` (the default, any device) and `vllm` (a CUDA GPU with vLLM
installed; see `vllm_backend`).
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
def generate_tokens(model: Any, tokenizer: Any, prompts: list[list[int]], gen: GenerationSettings, seed: int,
                    device: torch.device | None = None) -> list[list[int]]:
    """Each prompt's (token ids) new tokens, left-padded into one batch, up to and without the first
    end-of-sequence token. `temperature` 0 decodes greedily (and `seed` then changes nothing)."""
    from transformers import GenerationConfig

    device = device if device is not None else next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    sample = gen.temperature > 0
    config = GenerationConfig(max_new_tokens=gen.max_new_tokens, do_sample=sample,
                              temperature=gen.temperature if sample else None, top_p=gen.top_p if sample else None,
                              top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              use_cache=True)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    rows = out[:, ids.shape[1]:].tolist()
    return [row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row for row in rows]


def generate_batch(model: Any, tokenizer: Any, prompts: list[list[int]], gen: GenerationSettings, seed: int,
                   device: torch.device | None = None) -> list[str]:
    """One response per prompt (token ids): `generate_tokens`, decoded with special tokens dropped."""
    return [decode_response(tokenizer, row) for row in generate_tokens(model, tokenizer, prompts, gen, seed, device)]


def decode_response(tokenizer: Any, new_tokens: list[int]) -> str:
    """A response's text: its new tokens up to the first end-of-sequence token, special tokens dropped."""
    if tokenizer.eos_token_id in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def batch_seed(seed: int, dim: str, start: int) -> int:
    # zlib.crc32, not hash(): Python salts str hashes per process, which would break reproducibility.
    return seed * 1_000_003 + zlib.crc32(dim.encode()) + start


def length_batches(rows: list[dict[str, Any]], batch_size: int) -> list[list[int]]:
    """Indices of `rows` in batches of `batch_size`, by prompt length (longest first, so the largest batch --
    the memory peak -- comes first; ties in row order): similar lengths share a batch and little is padded."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["prompt_input_ids"]), i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def generate_for_model(er: EvalRun, model: Any, k: int, rows: dict[str, list[dict[str, Any]]],
                       gen: GenerationSettings, device: torch.device, progress: Any = None) -> list[dict[str, Any]]:
    """pi_k's responses to `rows[dim]` (from `prompt_rows`), one sample dict per prompt, in `rows`' order:
    {k, model, dim, index, pair_id, prompt, messages, response}. `progress` (an `Output.progress` handle)
    advances by the prompts of each batch. With the vllm backend `model` is a folder vLLM loads."""
    flat = [(d, r) for d, dim_rows in rows.items() for r in dim_rows]
    if gen.backend == "vllm":
        from .vllm_backend import generate_vllm

        texts = [decode_response(er.tokenizer, new) for new in
                 generate_vllm(model, [r["prompt_input_ids"] for _, r in flat], gen, gen.seed)]
        if progress is not None:
            progress.advance(len(flat))
    else:
        texts = []
        for d, dim_rows in rows.items():
            got = [""] * len(dim_rows)
            for start, batch in enumerate(length_batches(dim_rows, gen.batch_size)):
                answers = generate_batch(model, er.tokenizer, [dim_rows[i]["prompt_input_ids"] for i in batch], gen,
                                         batch_seed(gen.seed, d, start * gen.batch_size), device)
                for i, text in zip(batch, answers):
                    got[i] = text
                if progress is not None:
                    progress.advance(len(batch))
            texts += got
    return [{"k": k, "model": er.generator(k), "dim": d, "index": r["index"], "pair_id": r["pair_id"],
             "prompt": r["prompt"], "messages": list(r["messages"]), "response": text}
            for (d, r), text in zip(flat, texts)]
