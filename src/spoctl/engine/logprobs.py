"""Summed log-probabilities of completion tokens, computed without full-vocabulary logits for the whole batch.

The backbone runs once over the batch; the language-model head then runs only on the hidden states of positions
whose *next* token is a completion token, `chunk_size` positions at a time. In training each chunk is
checkpointed, so backward recomputes one chunk's logits instead of keeping [tokens x vocab] float32 logits
alive: a 150k-vocabulary model costs one chunk of logits, not one per token of the batch.

Which layout a batch uses (padded, packed, shared-prompt: see `batching.collate_pairs`) only changes the inputs
and the scored-token index; this module reads both the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UsageError
from .batching import TokenPair, PairBatch, shared_prompt_mask

# Attention implementations that take a custom 4-D mask as given (the shared-prompt layout needs one).
_CUSTOM_MASK_ATTENTION = ("sdpa", "eager")


def attention_implementation(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "eager")


def resolve_layout(layout: str, model: nn.Module) -> str:
    """`auto` picks the fastest layout the model's attention supports: shared-prompt where a custom mask works
    (SDPA, eager), packed for flash attention (whose variable-length kernel isolates packed sequences), padded
    otherwise. An explicit choice the attention cannot honour is an error rather than a silent fallback."""
    attn = attention_implementation(model)
    if layout == "auto":
        return "shared-prompt" if attn in _CUSTOM_MASK_ATTENTION else "packed" if "flash" in attn else "padded"
    if layout == "shared-prompt" and attn not in _CUSTOM_MASK_ATTENTION:
        raise UsageError(f"the shared-prompt layout needs an attention implementation that accepts a custom mask "
                         f"({', '.join(_CUSTOM_MASK_ATTENTION)}); this model uses {attn!r}: set align.layout to "
                         "padded or packed")
    return layout


def _head_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                scale: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.gather(logits.log_softmax(-1), 1, targets[:, None]).squeeze(1)


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] for a plain float32 linear head, holding one [chunk x vocab] tensor at
    a time in the forward and in the backward (the generic path holds the logits, their log-softmax and, in the
    backward, a gradient of each: about four). The backward recomputes the logits and turns them into the
    gradient in place: d/dlogits of (logit_t - logsumexp) is onehot(t) - softmax."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.t()
        picked = logits.gather(1, targets[:, None]).squeeze(1)
        # logsumexp in place (torch.logsumexp would allocate a second [chunk x vocab] tensor for exp(x - max)).
        top = logits.amax(dim=-1)
        lse = logits.sub_(top[:, None]).exp_().sum(-1).log_().add_(top)
        ctx.save_for_backward(hidden, weight, targets, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        g = hidden @ weight.t()
        g.sub_(lse[:, None]).exp_()  # softmax
        g.scatter_add_(1, targets[:, None], -torch.ones_like(lse)[:, None])  # softmax - onehot
        g.mul_(-grad[:, None])  # d out / d logits = onehot - softmax, times the incoming gradient
        grad_hidden = g @ weight if ctx.needs_input_grad[0] else None
        grad_weight = g.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


def _fused_head_ok(head: nn.Module, hidden: torch.Tensor, softcap: float | None, scale: float | None) -> bool:
    """The one-tensor path covers what it computes exactly like the generic one: a plain bias-free nn.Linear head
    (not a PEFT/bitsandbytes/FSDP-wrapped one, whose weight is not a plain tensor), float32 throughout, no autocast
    (which would compute the head in another dtype) and no logit post-processing."""
    weight = getattr(head, "weight", None)
    return (type(head) is nn.Linear and head.bias is None and type(weight) is nn.Parameter
            and weight.dtype == torch.float32 and hidden.dtype == torch.float32 and softcap is None and scale is None
            and not torch.is_autocast_enabled(hidden.device.type))


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
                segments: torch.Tensor | None, score_row: torch.Tensor, score_pos: torch.Tensor,
                score_target: torch.Tensor, score_owner: torch.Tensor, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        kwargs = {"input_ids": input_ids, "use_cache": False,
                  "attention_mask": model_attention_mask(self.model, attention_mask, segments)}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        hidden = backbone(**kwargs).last_hidden_state  # [rows, T, H]
        states = hidden[score_row, score_pos]  # [M, H]: the state that predicts each scored token

        pieces = []
        for start in range(0, states.shape[0], self.chunk_size):
            h, t = states[start:start + self.chunk_size], score_target[start:start + self.chunk_size]
            if _fused_head_ok(head, h, self._softcap, self._scale):
                # Its backward recomputes the logits itself: nothing to checkpoint.
                pieces.append(_LinearTokenLogps.apply(h, head.weight, t))
            elif torch.is_grad_enabled() and h.requires_grad:
                pieces.append(checkpoint(_head_logps, head, h, t, self._softcap, self._scale, use_reentrant=False))
            else:
                pieces.append(_head_logps(head, h, t, self._softcap, self._scale))
        token_logps = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)

        sums = token_logps.new_zeros(n_seqs).index_add(0, score_owner, token_logps)
        counts = torch.zeros(n_seqs, dtype=torch.long, device=score_owner.device).index_add(
            0, score_owner, torch.ones_like(score_owner))
        return sums, counts


def compile_backbone(model: nn.Module, backend: str = "inductor") -> None:
    """Compile the transformer stack in place (parameter names, and so checkpoints, stay the same). Only the
    backbone: the LM head runs in variable-size chunks under checkpoint, where compiling buys little. Dynamic
    shapes, because every batch has its own length. A model compiled for its frozen pass and then trained as the
    next policy is not wrapped twice."""
    backbone = model.get_decoder()
    if getattr(backbone, "_compiled_call_impl", None) is None:
        backbone.compile(dynamic=True, backend=backend)


def check_compile_supported(compile: bool, device_type: str) -> None:
    """`align.compile` runs on GPUs only. On CPUs, torch 2.13's compiled attention is wrong in ways that depend on
    the CPU: with AVX2 kernels masked attention returns NaN (padded and shared-prompt batches alike), with AVX-512
    kernels an additive 4-D mask corrupts the heap. Measured gain on CPU where it did run: +6%, within noise."""
    if compile and device_type != "cuda":
        raise UsageError("align.compile needs a CUDA GPU: on CPUs torch.compile's attention kernels return NaN or "
                         "crash with masked attention (torch 2.13), and gain nothing measurable; leave compile off")


def attention_window(model: nn.Module) -> int | None:
    """The sliding-window (or chunked-attention) span of the model's attention, if any layer uses one. The
    shared-prompt mask is plain causal; it equals the model's own mask only while no position is that far back."""
    cfg = getattr(model, "config", None)
    spans = []
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    if window and (not layer_types or "sliding_attention" in layer_types):
        spans.append(int(window))
    if getattr(cfg, "attention_chunk_size", None):
        spans.append(int(cfg.attention_chunk_size))
    return min(spans) if spans else None


def batch_layout(layout: str, pairs: Sequence[TokenPair], window: int | None) -> str:
    """The layout for one batch: shared-prompt unless a pair reaches past the attention window (the furthest
    position is len(prompt) + the longer response), where the padded layout lets the model apply its own window."""
    if layout == "shared-prompt" and window is not None:
        if any(len(p.prompt) + max(len(p.chosen), len(p.rejected)) > window for p in pairs):
            return "padded"
    return layout


def model_attention_mask(model: nn.Module, attention_mask: torch.Tensor | None,
                         segments: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as the model takes it: the 2-D padding mask as is; for the shared-prompt layout a 4-D mask,
    boolean for SDPA, additive for eager attention (which adds the mask to the scores)."""
    if segments is None:
        return attention_mask
    allowed = shared_prompt_mask(segments)
    if attention_implementation(model) == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def score_batch(scorer: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths), each [B]."""
    sums, counts = scorer(batch.input_ids, batch.attention_mask, batch.position_ids, batch.segments, batch.score_row,
                          batch.score_pos, batch.score_target, batch.score_owner, 2 * batch.n_pairs)
    b = batch.n_pairs
    return sums[:b], sums[b:], counts[:b], counts[b:]


def reference_logps(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward computation (full logits from the model's own forward), used by tests to hold the
    chunked path to the truth."""
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                attention_mask=model_attention_mask(model, batch.attention_mask, batch.segments))
    logps = out.logits.float().log_softmax(-1)[batch.score_row, batch.score_pos]  # [M, V]
    tok = torch.gather(logps, 1, batch.score_target[:, None]).squeeze(1)
    sums = tok.new_zeros(2 * batch.n_pairs).index_add(0, batch.score_owner, tok)
    return sums[:batch.n_pairs], sums[batch.n_pairs:]
