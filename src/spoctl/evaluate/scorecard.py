"""The implicit-reward scorecard (no generation): for the base model and every completed stage, on every
dimension's held-out pairs, how often and by how much the model prefers the chosen response.

For model pi_k (k = 0 is the base) on dimension d's eval pairs (y_w chosen, y_l rejected), with
Delta(p, q) = log-ratio margin of losses.log_ratio_margin:

  vs_base          Delta(pi_k, pi_0): everything aligned so far against the base. Rows k x columns d is the
                   forgetting matrix: a later stage that undoes an earlier dimension lowers that column.
  stage_reward     beta_k * Delta(pi_k, pi_{k-1}): what stage k itself changed (its whole training target).
  implicit_reward  Delta r_k of docs/method.md (losses.implicit_reward_margins): stage k's reward with the
                   earlier dimensions' part subtracted, i.e. the reward of dimension k alone.
  logp             log pi_k(y_w) - log pi_k(y_l): the model's own likelihood preference (length-biased; the only
                   one defined for the base).

Each metric is {"accuracy": share of pairs with margin > 0, "margin": mean margin}. The log-probs live in the
same cache as `spoctl align`'s frozen passes, so numbers align already computed are reused.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .. import losses
from ..config import EvalConfig
from ..console import Output
from .runinfo import EvalRun

METRICS = ("vs_base", "stage_reward", "implicit_reward", "logp")


def _block(margin: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}


def stage_betas_and_weights(stages: list[dict[str, Any]], run_dims: list[str]) -> tuple[list[float], list[list[float]]]:
    """beta_k and lambda^(k) of each completed stage, as recorded in the manifest, in losses' 0-based layout."""
    betas = [float(st["plan"]["beta"]) for st in stages]
    weights = [[float((st.get("weights") or {}).get(d, 0.0)) for d in run_dims[: st["index"] - 1]] for st in stages]
    return betas, weights


def scorecard_from_logps(logps: dict[tuple[int, str], Any], stages: list[dict[str, Any]], dims: list[str],
                         run_dims: list[str]) -> list[dict[str, Any]]:
    """Rows k = 0..K; `logps[(k, d)]` has `.chosen` / `.rejected` summed log-probs of pi_k on d's eval pairs."""
    k_max = len(stages)
    betas, weights = stage_betas_and_weights(stages, run_dims)
    rows: list[dict[str, Any]] = []
    per_dim_rewards = {}
    for d in dims:
        lp = [logps[(k, d)] for k in range(k_max + 1)]
        per_dim_rewards[d] = losses.implicit_reward_margins(betas, weights, [x.chosen for x in lp],
                                                            [x.rejected for x in lp])
    for k in range(k_max + 1):
        cells: dict[str, Any] = {}
        for d in dims:
            cur, base = logps[(k, d)], logps[(0, d)]
            cell: dict[str, Any] = {"pairs": int(cur.chosen.numel()),
                                    "logp": _block(cur.chosen - cur.rejected)}
            if k > 0:
                prev = logps[(k - 1, d)]
                cell["vs_base"] = _block(losses.log_ratio_margin(cur.chosen, cur.rejected, base.chosen, base.rejected))
                m = losses.reward_metrics(betas[k - 1], cur.chosen, cur.rejected, prev.chosen, prev.rejected)
                cell["stage_reward"] = {"accuracy": m["rewards/accuracies"], "margin": m["rewards/margins"]}
                cell["implicit_reward"] = _block(per_dim_rewards[d][k - 1])
            cells[d] = cell
        rows.append({"k": k, "model": "base" if k == 0 else stages[k - 1]["dim"],
                     "beta": betas[k - 1] if k else None, "dims": cells})
    return rows


class EvalLogps:
    """pi_k's summed log-probs on the evaluated dimensions' eval pairs, in the frozen-pass cache `spoctl align`
    uses (same folder, same key: data hash, model fingerprint, dtype), so passes align already made are free and
    passes made here serve later runs. The caller loads each model once and hands it in (`compute`): with
    GGUF or LoRA-chain models, loading costs far more than scoring a few hundred pairs."""

    def __init__(self, er: EvalRun, cfg: EvalConfig, device: torch.device):
        from ..engine.frozen import LogpsCache, logps_cache_dir
        from ..engine.processes import Processes
        from ..engine.scoring import Scoring
        from ..precision import dtype_of, normalize

        self.er, self.cfg, self.device = er, cfg, device
        precision = normalize(er.manifest.get("precision"))
        if device.type != "cuda" and precision == "fp16":
            precision = "fp32"  # fp16 autocast has no CPU path
        self.precision = precision
        self.dtype = dtype_of(precision)
        # Under several processes (torchrun -m spoctl eval) each scores a share of the pairs; the main one writes.
        self.procs = Processes.from_launcher(device)
        self.scoring = Scoring(device=device, pad_token_id=er.tokenizer.pad_token_id, precision=precision,
                               procs=self.procs, batch_size=cfg.batch_size, chunk_size=cfg.logprob_chunk)
        self.cache = LogpsCache(logps_cache_dir(er.prepared.path, er.run), er.prepared, er.chain.fingerprint,
                                self.dtype, procs=self.procs)

    def missing(self, k: int) -> list[str]:
        return [d for d, _ in self.cache.lookup(k, [(d, "eval") for d in self.er.dims])]

    def compute(self, model: Any, k: int, dims: list[str], out: Output) -> None:
        from ..engine.batching import pairs_from_split

        t = time.perf_counter()
        scoring = self.scoring.with_(out=out)
        splits = {d: pairs_from_split(self.er.prepared.split(d, "eval")) for d in dims}
        scoring.announce(f"log-probs of {self.er.label(k)} on {', '.join(f'{d}/eval' for d in dims)}: "
                         f"{sum(len(p) for p in splits.values())} pairs, one pass")
        for d, pairs in splits.items():
            self.cache.put(k, d, "eval", scoring.score(model, pairs, label=f"{self.er.label(k)} {d}/eval"))
        out.detail(f"log-probs of {self.er.label(k)} on {', '.join(dims)} eval pairs in {time.perf_counter() - t:.1f}s")

    def get(self, k: int, dim: str) -> Any:
        return self.cache.get(k, dim, "eval")

    def scorecard(self) -> list[dict[str, Any]]:
        logps = {(k, d): self.get(k, d) for k in range(self.er.k_max + 1) for d in self.er.dims}
        run_dims = list(self.er.manifest.get("dims") or self.er.dims)
        return scorecard_from_logps(logps, self.er.stages, self.er.dims, run_dims)


def gate_scores(rows: list[dict[str, Any]], dim: str) -> list[float]:
    """Per stage k = 1..K: the scorecard score the gate checks, the accuracy of log(pi_k / pi_0) on `dim`."""
    return [r["dims"][dim]["vs_base"]["accuracy"] for r in rows if r["k"] > 0]
