"""The numerical check: the exported model must score held-out pairs like the stage checkpoint does.

Two comparisons of summed completion log-probs, pair by pair (chosen and rejected sequences):

- *exact*: the exported model against the checkpoint cast to the export dtype. Same weights should give the same
  numbers, so the tolerance is tight at every dtype; this is what catches a wrong merge or a lost tensor.
  fp32: |a - b| <= 1e-4 * |b| + 1e-3. bf16 / fp16: |a - b| <= 1e-3 * |b| + 1e-2.
- *drift* (bf16 / fp16 only): the exported model against the float32 checkpoint. Rounding weights to 16 bits
  moves log-probs a little; more than 0.1 nats per completion token on average (bf16; 0.05 for fp16, which keeps
  more mantissa) means the cast broke something (overflow, a layer that needs float32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..console import Output
from ..engine.batching import TokenPair, pairs_from_split
from ..engine.scoring import Scoring
from ..errors import UsageError
from .stage import ExportSource

EXACT_TOL = {"fp32": (1e-4, 1e-3), "bf16": (1e-3, 1e-2), "fp16": (1e-3, 1e-2)}  # (rtol, atol)
DRIFT_PER_TOKEN = {"bf16": 0.1, "fp16": 0.05}  # nats per completion token, mean over sequences
_FALLBACK = [
    ("What is the capital of France?", "The capital of France is Paris.", "I do not know."),
    ("Write a haiku about rain.", "Soft rain on the roof, / the garden drinks quietly, / puddles hold the sky.",
     "Rain is water."),
]


@dataclass
class CheckResult:
    pairs: int
    source: str  # "prepared:<dim>/eval" or "fixed sequences"
    dtype: str
    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    atol: float
    drift_per_token: float | None = None
    drift_limit: float | None = None
    passed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_pairs(src: ExportSource, tokenizer: Any, n: int, out: Output) -> tuple[list[TokenPair], str]:
    """The n shortest held-out pairs of the stage's dimension (short: the check runs the model in the export dtype,
    which on a CPU can be slow); two fixed pairs when the prepared data is gone."""
    from ..data.store import load_prepared

    try:
        if src.prepared_dir is None:
            raise UsageError(f"{src.manifest.get('data')} is not there")
        ds = load_prepared(src.prepared_dir).split(src.dim, "eval")
        every = [p for p in pairs_from_split(ds) if p.prompt and p.chosen and p.rejected]
        pairs = sorted(every, key=lambda p: p.length)[:n]
        if pairs:
            return pairs, f"prepared:{src.dim}/eval"
    except (UsageError, KeyError) as err:
        out.warn(f"numerical check: prepared data unavailable ({err}); using {len(_FALLBACK)} fixed pairs instead")
    return [_fixed_pair(tokenizer, *texts) for texts in _FALLBACK], "fixed sequences"


def _fixed_pair(tok: Any, prompt: str, chosen: str, rejected: str) -> TokenPair:
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = f"Question: {prompt}\nAnswer:"
    ids = tok.encode(text, add_special_tokens=False)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return TokenPair(ids, tok.encode(" " + chosen, add_special_tokens=False) + eos,
                tok.encode(" " + rejected, add_special_tokens=False) + eos)


def sequence_logps(model: nn.Module, pairs: list[TokenPair], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of every sequence (chosen ones, then rejected ones) and their token counts, in
    the model's own dtype (the check compares dtypes, so no autocast), padded batches of 4."""
    device = next(model.parameters()).device
    logps = Scoring(device=device, pad_token_id=pad_token_id, batch_size=4, layout="padded").score(model, pairs)
    counts = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs])
    return torch.cat([logps.chosen, logps.rejected]), counts


def compare(exported: torch.Tensor, exact_ref: torch.Tensor, fp32_ref: torch.Tensor, counts: torch.Tensor,
            dtype: str, source: str) -> CheckResult:
    rtol, atol = EXACT_TOL[dtype]
    diff = (exported - exact_ref).abs()
    res = CheckResult(pairs=len(exported) // 2, source=source, dtype=dtype, max_abs_diff=_f(diff.max()),
                      max_rel_diff=_f((diff / exact_ref.abs().clamp_min(1e-6)).max()), rtol=rtol, atol=atol)
    ok = bool(torch.isfinite(exported).all()) and bool((diff <= atol + rtol * exact_ref.abs()).all())
    if dtype in DRIFT_PER_TOKEN:
        res.drift_per_token = _f(((exported - fp32_ref).abs() / counts.clamp_min(1)).mean())
        res.drift_limit = DRIFT_PER_TOKEN[dtype]
        ok = ok and res.drift_per_token <= res.drift_limit
    res.passed = ok
    return res


def _f(t: torch.Tensor) -> float:
    v = float(t)
    return v if math.isfinite(v) else float("inf")
