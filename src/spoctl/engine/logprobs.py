"""Summed log-probabilities of completion tokens, computed without full-vocabulary logits for the whole batch.

The backbone runs once over the batch; the language-model head then runs only on the hidden states of positions
whose *next* token is a completion token, `chunk_size` positions at a time. In training each chunk is
checkpointed, so backward recomputes one chunk's logits instead of keeping [tokens x vocab] float32 logits
alive: a 150k-vocabulary model costs one chunk of logits, not one per token of the batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .batching import PairBatch


def _head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                scale: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.gather(logits.log_softmax(-1), 1, targets[:, None]).squeeze(1)


class SequenceScorer(nn.Module):
    """Wraps a causal LM so that `forward(batch)` returns per-sequence summed completion log-probs.

    Wrapping (instead of calling the backbone from outside) matters under DistributedDataParallel: DDP only
    synchronises gradients for computation that goes through the wrapped module's forward.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 256):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        cfg = getattr(model, "config", None)
        # Post-processing some architectures apply to logits after the head (Gemma 2 soft-capping, Cohere scale).
        self._softcap = getattr(cfg, "final_logit_softcapping", None)
        self._scale = getattr(cfg, "logit_scale", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                target_mask: torch.Tensor, seq_index: torch.Tensor, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        kwargs = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        hidden = backbone(**kwargs).last_hidden_state  # [rows, T, H]

        # The state at position t predicts token t+1: select the states whose next token is scored.
        select = target_mask[:, 1:]
        states = hidden[:, :-1][select]  # [M, H]
        targets = input_ids[:, 1:][select]  # [M]
        owners = seq_index[:, 1:][select]  # [M]

        pieces = []
        for start in range(0, states.shape[0], self.chunk_size):
            h, t = states[start:start + self.chunk_size], targets[start:start + self.chunk_size]
            if torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(_head_logps, head, h, t, self._softcap, self._scale, use_reentrant=False))
            else:
                pieces.append(_head_logps(head, h, t, self._softcap, self._scale))
        token_logps = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)

        sums = token_logps.new_zeros(n_seqs).index_add(0, owners, token_logps)
        counts = torch.zeros(n_seqs, dtype=torch.long, device=owners.device).index_add(
            0, owners, torch.ones_like(owners))
        return sums, counts


def score_batch(scorer: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths), each [B]."""
    sums, counts = scorer(batch.input_ids, batch.attention_mask, batch.position_ids, batch.target_mask,
                          batch.seq_index, 2 * batch.n_pairs)
    b = batch.n_pairs
    return sums[:b], sums[b:], counts[:b], counts[b:]


def reference_logps(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward computation (full logits from the model's own forward), used by tests to hold the
    chunked path to the truth."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False)
    logps = out.logits[:, :-1].float().log_softmax(-1)
    tok = torch.gather(logps, 2, batch.input_ids[:, 1:, None]).squeeze(2)
    mask = batch.target_mask[:, 1:]
    owners = batch.seq_index[:, 1:][mask]
    sums = tok.new_zeros(2 * batch.n_pairs).index_add(0, owners, tok[mask])
    return sums[:batch.n_pairs], sums[batch.n_pairs:]
