"""Turning prepared pairs into model inputs: length-grouped batch order, padded or packed layouts.

A pair (prompt P, chosen C, rejected R) becomes two sequences, P+C and P+R. A batch of B pairs holds 2B
sequences: rows 0..B-1 are the chosen ones, rows B..2B-1 the rejected ones, so one forward serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Pair:
    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]

    @property
    def length(self) -> int:
        """Tokens one pair costs in a forward pass (both sequences)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def pairs_from_split(ds) -> list[Pair]:
    """A prepared split (columns prompt_input_ids, chosen_input_ids, rejected_input_ids) as engine pairs."""
    return [Pair(p, c, r) for p, c, r in zip(ds["prompt_input_ids"], ds["chosen_input_ids"], ds["rejected_input_ids"])]


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [rows, T]
    attention_mask: torch.Tensor | None  # [rows, T] for padded batches; None when packed
    position_ids: torch.Tensor | None  # [1, T] restarting at 0 per sequence when packed
    target_mask: torch.Tensor  # [rows, T] True where the token is a completion token (it is scored)
    seq_index: torch.Tensor  # [rows, T] which of the 2B sequences a position belongs to (-1 for padding)
    n_pairs: int
    n_tokens: int  # real (non-padding) tokens

    def to(self, device: torch.device | str) -> "PairBatch":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return PairBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.position_ids), mv(self.target_mask),
                         mv(self.seq_index), self.n_pairs, self.n_tokens)


def collate_pairs(pairs: Sequence[Pair], pad_token_id: int, pack: bool = False) -> PairBatch:
    """Build one batch. `pack=True` puts every sequence in one row with restarting position ids and no padding
    (the attention implementation must isolate sequences; transformers does so from position_ids)."""
    seqs = [(list(p.prompt), list(p.chosen)) for p in pairs] + [(list(p.prompt), list(p.rejected)) for p in pairs]
    for prompt, completion in seqs:
        if not prompt or not completion:
            # The first token of a sequence has no prediction; a completion token must have a prompt before it.
            raise ValueError("every pair needs at least one prompt token and one completion token")
    n_tokens = sum(len(a) + len(b) for a, b in seqs)
    if pack:
        ids, tmask, sidx, pos = [], [], [], []
        for i, (prompt, completion) in enumerate(seqs):
            n = len(prompt) + len(completion)
            ids += prompt + completion
            tmask += [False] * len(prompt) + [True] * len(completion)
            sidx += [i] * n
            pos += list(range(n))
        return PairBatch(
            input_ids=torch.tensor([ids], dtype=torch.long),
            attention_mask=None,
            position_ids=torch.tensor([pos], dtype=torch.long),
            target_mask=torch.tensor([tmask], dtype=torch.bool),
            seq_index=torch.tensor([sidx], dtype=torch.long),
            n_pairs=len(pairs),
            n_tokens=n_tokens,
        )
    width = max(len(a) + len(b) for a, b in seqs)
    rows = len(seqs)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    target_mask = torch.zeros((rows, width), dtype=torch.bool)
    seq_index = torch.full((rows, width), -1, dtype=torch.long)
    for i, (prompt, completion) in enumerate(seqs):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        attention_mask[i, :n] = 1
        target_mask[i, len(prompt):n] = True
        seq_index[i, :n] = i
    return PairBatch(input_ids, attention_mask, None, target_mask, seq_index, len(pairs), n_tokens)


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *, group_by_length: bool = True,
                megabatch_factor: int = 16) -> list[list[int]]:
    """The global batches of one epoch, as lists of pair indices: a pure function of (seed, epoch), which is what
    makes resuming at an exact data position possible.

    Length grouping (as in Hugging Face's LengthGroupedSampler): shuffle, cut into mega-batches of
    `megabatch_factor` batches, sort each by length so a batch holds similar lengths (little padding), then
    shuffle the batch order. An incomplete last batch is dropped so every optimizer step sees `batch_size` pairs.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    batches: list[list[int]] = []
    if group_by_length:
        mega = batch_size * megabatch_factor
        for start in range(0, len(perm), mega):
            chunk = sorted(perm[start:start + mega], key=lambda i: -lengths[i])
            batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    else:
        batches = [perm[j:j + batch_size] for j in range(0, len(perm), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def local_micro_batches(global_batch: Sequence[int], lengths: Sequence[int], rank: int, world: int,
                        micro_batch_size: int) -> list[list[int]]:
    """This process's share of a global batch (every `world`-th pair), cut into micro-batches of similar length.
    Every rank gets the same number of micro-batches, which distributed backward passes require."""
    if len(global_batch) % world:
        raise ValueError(f"a global batch of {len(global_batch)} pairs cannot be split evenly over {world} processes")
    local = sorted(global_batch[rank::world], key=lambda i: -lengths[i])
    return [local[j:j + micro_batch_size] for j in range(0, len(local), micro_batch_size)]


def inference_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches for a no-grad pass: sorted by length so padding is minimal; the order does not matter."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
