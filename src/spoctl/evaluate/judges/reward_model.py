"""The `reward-model` judge: one Hugging Face sequence-classification model per dimension scores each response;
the higher score wins.

`--judge-model helpful=PATH`: PATH is a local folder (or Hub id) loadable with AutoModelForSequenceClassification.
A one-label head's logit is the reward; with two labels the reward is logit[1] - logit[0] ("good" minus "bad").
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import Judge, JudgeContext, JudgeUnavailable, Matchup, conversation_text, score_from_values


class RewardModelJudge(Judge):
    name = "reward-model"

    def __init__(self, models: dict[str, str], *, batch_size: int = 8, max_length: int = 1024,
                 trust_remote_code: bool = False):
        self.specs = dict(models)
        self.batch_size, self.max_length, self.trust_remote_code = batch_size, max_length, trust_remote_code
        self._loaded: dict[str, tuple[Any, Any]] = {}

    @classmethod
    def from_settings(cls, settings: Any, context: JudgeContext) -> "RewardModelJudge":
        if not settings.models:
            raise JudgeUnavailable("the reward-model judge needs a model per dimension: --judge-model helpful=PATH")
        return cls(settings.models, trust_remote_code=context.trust_remote_code)

    def prepare(self, dims: Sequence[str]) -> None:
        missing = [d for d in dims if d not in self.specs]
        if missing:
            raise JudgeUnavailable(
                f"the reward-model judge needs a model for every dimension; missing: {', '.join(missing)}"
                f" (pass --judge-model {missing[0]}=PATH)")
        for d in dims:
            self._load(d)

    def _load(self, dim: str) -> tuple[Any, Any]:
        if dim not in self._loaded:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            spec = self.specs[dim]
            try:
                tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=self.trust_remote_code)
                model = AutoModelForSequenceClassification.from_pretrained(
                    spec, trust_remote_code=self.trust_remote_code, use_safetensors=True)
            except Exception as err:  # OSError, ValueError, Hub errors: all mean "cannot use this model"
                raise JudgeUnavailable(f"reward model for '{dim}' ({spec}) cannot be loaded: "
                                       f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            # Batched scoring of padded rows needs the model to know which token pads.
            model.config.pad_token_id = tok.pad_token_id
            self._loaded[dim] = (tok, model.eval())
        return self._loaded[dim]

    @torch.inference_mode()
    def scores(self, dim: str, texts: Sequence[str]) -> list[float]:
        tok, model = self._load(dim)
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = tok(list(texts[start:start + self.batch_size]), return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_length)
            logits = model(**enc).logits.float()
            out += (logits[:, 0] if logits.shape[1] == 1 else logits[:, -1] - logits[:, 0]).tolist()
        return out

    def compare(self, items: Sequence[Matchup]) -> list[float]:
        verdicts: list[float] = [0.5] * len(items)
        for dim in dict.fromkeys(m.dim for m in items):
            idx = [i for i, m in enumerate(items) if m.dim == dim]
            texts = [conversation_text(items[i], r) for i in idx for r in (items[i].a, items[i].b)]
            s = self.scores(dim, texts)
            for j, i in enumerate(idx):
                verdicts[i] = score_from_values(s[2 * j], s[2 * j + 1])
        return verdicts

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "models": self.specs}

    def close(self) -> None:
        self._loaded.clear()
