"""Turning prepared pairs into model inputs: length-grouped batch order, padded or packed layouts.

A pair (prompt P, chosen C, rejected R) becomes two sequences, P+C and P+R. A batch of B pairs holds 2B
sequences: rows 0..B-1 are the chosen ones, rows B..2B-1 the rejected ones, so one forward serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenPair:
    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]

    @property
    def length(self) -> int:
        """Real tokens of prompt+chosen and prompt+rejected (how throughput is counted, by peers too)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def sort_length(self) -> int:
        """What batches are grouped by: a shared-prompt row's width, prompt + chosen + rejected. (Grouping by
        `length`, which counts the prompt twice, left twice the padding: 16% vs 7% of a 16-pair batch's
        positions on uniformly drawn lengths.)"""
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def pairs_from_split(ds) -> list[TokenPair]:
    """A prepared split (columns prompt_input_ids, chosen_input_ids, rejected_input_ids) as engine pairs."""
    return [TokenPair(p, c, r) for p, c, r in zip(ds["prompt_input_ids"], ds["chosen_input_ids"], ds["rejected_input_ids"])]


LAYOUTS = ("padded", "packed", "shared-prompt")


@dataclass
class PairBatch:
    """Model inputs for B pairs plus, for every scored token, where its prediction comes from.

    Scored tokens are listed flat (M of them): token `score_target[m]` of sequence `score_owner[m]` (0..B-1 the
    chosen, B..2B-1 the rejected) is predicted by the hidden state at row `score_row[m]`, position `score_pos[m]`.
    Listing the source explicitly (rather than "the position before") is what lets the shared-prompt layout
    predict a rejected response's first token from the prompt's last state.
    """

    input_ids: torch.Tensor  # [rows, T]
    attention_mask: torch.Tensor | None  # [rows, T] padded; None packed; None shared-prompt (built from segments)
    position_ids: torch.Tensor | None  # [rows, T] packed and shared-prompt; None padded
    segments: torch.Tensor | None  # shared-prompt: [rows, T] 0 prompt, 1 chosen, 2 rejected, -1 padding
    score_row: torch.Tensor  # [M]
    score_pos: torch.Tensor  # [M]
    score_target: torch.Tensor  # [M]
    score_owner: torch.Tensor  # [M]
    n_pairs: int
    n_tokens: int  # real tokens of prompt+chosen and prompt+rejected (the prompt counted twice, as peers count)

    def to(self, device: torch.device | str) -> "PairBatch":
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return PairBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.position_ids), mv(self.segments),
                         mv(self.score_row), mv(self.score_pos), mv(self.score_target), mv(self.score_owner),
                         self.n_pairs, self.n_tokens)


class _Rows:
    """Accumulates token rows and the scored-token index while a layout is being built."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.positions: list[list[int]] = []
        self.segments: list[list[int]] = []
        self.score: list[tuple[int, int, int, int]] = []  # (row, source position, target token, owner)

    def score_run(self, row: int, first_source: int, start: int, tokens: Sequence[int], owner: int) -> None:
        """Score `tokens`, placed at positions start.. of `row`; the first is predicted from `first_source`."""
        for j, tok in enumerate(tokens):
            self.score.append((row, first_source if j == 0 else start + j - 1, tok, owner))


def collate_pairs(pairs: Sequence[TokenPair], pad_token_id: int, layout: str = "padded") -> PairBatch:
    """Build one batch in one of three layouts (all give the same log-probs; tests hold them to it):

    - `padded`: 2B rows, P+C and P+R, right-padded to the longest.
    - `packed`: every sequence in one row, position ids restarting per sequence, no padding (the attention
      implementation must isolate sequences; transformers does so from the position ids).
    - `shared-prompt`: one row per pair, P+C+R, the prompt computed once for both responses. The rejected tokens
      take positions from len(P) again and, through a 4-D mask, see the prompt but not the chosen response.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    for p in pairs:
        if not p.prompt or not p.chosen or not p.rejected:
            # The first token of a sequence has no prediction; a completion token must have a prompt before it.
            raise ValueError("every pair needs at least one prompt token and one completion token")
    b = len(pairs)
    n_tokens = sum(p.length for p in pairs)
    acc = _Rows()
    if layout == "shared-prompt":
        for i, p in enumerate(pairs):
            lp, lc = len(p.prompt), len(p.chosen)
            acc.rows.append([*p.prompt, *p.chosen, *p.rejected])
            acc.positions.append([*range(lp + lc), *range(lp, lp + len(p.rejected))])
            acc.segments.append([0] * lp + [1] * lc + [2] * len(p.rejected))
            acc.score_run(i, lp - 1, lp, p.chosen, i)
            acc.score_run(i, lp - 1, lp + lc, p.rejected, b + i)
    else:
        seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        for i, (prompt, completion) in enumerate(seqs):
            row, start = (0, len(acc.rows[0]) if acc.rows else 0) if layout == "packed" else (i, 0)
            if row == len(acc.rows):
                acc.rows.append([])
                acc.positions.append([])
            acc.rows[row] += [*prompt, *completion]
            acc.positions[row] += range(len(prompt) + len(completion))
            acc.score_run(row, start + len(prompt) - 1, start + len(prompt), completion, i)

    width = max(map(len, acc.rows))
    input_ids = torch.full((len(acc.rows), width), pad_token_id, dtype=torch.long)
    real = torch.zeros((len(acc.rows), width), dtype=torch.bool)
    for r, ids in enumerate(acc.rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        real[r, :len(ids)] = True
    positions = segments = attention_mask = None
    if layout == "padded":
        attention_mask = real.long()
    else:
        positions = torch.zeros_like(input_ids)
        for r, pos in enumerate(acc.positions):
            positions[r, :len(pos)] = torch.tensor(pos)
    if layout == "shared-prompt":
        segments = torch.full_like(input_ids, -1)
        for r, seg in enumerate(acc.segments):
            segments[r, :len(seg)] = torch.tensor(seg)
    row, pos, target, owner = torch.tensor(acc.score, dtype=torch.long).reshape(-1, 4).unbind(1)
    return PairBatch(input_ids, attention_mask, positions, segments, row, pos, target, owner, b, n_tokens)


def shared_prompt_mask(segments: torch.Tensor) -> torch.Tensor:
    """[rows, 1, T, T] boolean attention mask (True: may attend) for the shared-prompt layout: causal, and a
    response sees the prompt and itself, never the other response. A padding position sees only itself, so no
    softmax row is empty (an empty row gives NaN, which would leak into the real rows through the backward)."""
    t = segments.shape[1]
    ar = torch.arange(t, device=segments.device)
    causal = ar[:, None] >= ar[None, :]
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    return (allowed | torch.eye(t, dtype=torch.bool, device=segments.device))[:, None]


# Batches per mega-batch when grouping by length: the more, the closer the lengths within a batch, the fewer
# distinct orders an epoch can take (Hugging Face's LengthGroupedSampler uses up to 50).
MEGABATCH_FACTOR = 16


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch, as lists of pair indices: a pure function of (seed, epoch), which is what
    makes resuming at an exact data position possible.

    Length grouping (as in Hugging Face's LengthGroupedSampler): shuffle, cut into mega-batches of
    `MEGABATCH_FACTOR` batches, sort each by length so a batch holds similar lengths (little padding), then
    shuffle the batch order. An incomplete last batch is dropped so every optimizer step sees `batch_size` pairs.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    batches: list[list[int]] = []
    mega = batch_size * MEGABATCH_FACTOR
    for start in range(0, len(perm), mega):
        chunk = sorted(perm[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
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
