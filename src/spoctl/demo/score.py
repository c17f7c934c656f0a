"""Rule-judged scores on the demo task: generate greedy answers to held-out demo prompts, score them with
`task.rule_score`. Shared by `spoctl demo`, the study, and (through `judge_responses`) the `rules` judge of eval.
"""

from __future__ import annotations

from typing import Any, Sequence

from . import task

MAX_NEW_TOKENS = 32  # the longest demo response is ~22 tokens: room to see rambling, no more
GEN_BATCH = 64


def generate(model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers (deterministic), one per prompt, decoded without special tokens: eval's left-pad-and-generate
    on the demo's rendered prompts."""
    from ..config import GenerationSettings
    from ..evaluate.generate import generate_batch
    from .model import prompt_ids

    model.eval()
    greedy = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=GEN_BATCH)
    texts: list[str] = []
    for start in range(0, len(prompts), GEN_BATCH):
        rows = [prompt_ids(tok, p) for p in prompts[start : start + GEN_BATCH]]
        texts += generate_batch(model, tok, rows, greedy, seed=0)
    return texts


def judge_responses(dims: Sequence[str], prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """Mean rule score per dimension over (prompt, response) pairs."""
    return {d: sum(task.rule_score(d, p, r) for p, r in zip(prompts, responses)) / max(1, len(prompts)) for d in dims}


def score_model(model: Any, tok: Any, dims: Sequence[str], prompts: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """(mean rule score per dimension, the greedy responses) of `model` on `prompts`."""
    responses = generate(model, tok, prompts)
    return judge_responses(dims, prompts, responses), responses


def candidate_logps(model: Any, tok: Any, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
    """log pi(response | prompt) of each candidate response (end-of-turn token included), per prompt: the engine's
    chunked scorer (`engine.frozen.compute_logps`), the candidates of a prompt scored two at a time as the
    (chosen, rejected) sides of one pair."""
    import torch

    from ..engine.batching import TokenPair
    from ..engine.frozen import compute_logps
    from .model import prompt_ids

    pairs, slots = [], []  # slots[i]: (pair, side) of the i-th candidate, in order
    for p, cands in zip(prompts, responses):
        pids = prompt_ids(tok, p)
        ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in cands]
        for j in range(0, len(ids), 2):
            # An odd candidate out is paired with itself: its second side is scored and ignored.
            second = ids[j + 1] if j + 1 < len(ids) else ids[j]
            slots += [(len(pairs), 0)] + ([(len(pairs), 1)] if j + 1 < len(ids) else [])
            pairs.append(TokenPair(pids, ids[j], second))
    model.eval()
    logps = compute_logps(model, pairs, batch_size=GEN_BATCH, pad_token_id=tok.pad_token_id, chunk_size=256,
                          device=next(model.parameters()).device)
    sides = torch.stack([logps.chosen, logps.rejected], dim=1).tolist()
    totals = [sides[i][side] for i, side in slots]
    out, k = [], 0
    for cands in responses:
        out.append(totals[k : k + len(cands)])
        k += len(cands)
    return out


def expected_scores(model: Any, tok: Any, dims: Sequence[str], prompts: Sequence[str]) -> dict[str, float]:
    """A smooth companion of the greedy score: the expected rule score when the model picks among the task's
    candidate responses with probability proportional to pi(response | prompt). Moves with every change of the
    model's preferences, where the greedy score moves only when the most likely answer flips."""
    import math
    import random

    rng = random.Random(f"{task.TASK_NAME}/expected")
    cands = [task.candidates(p, rng) for p in prompts]
    logps = candidate_logps(model, tok, prompts, cands)
    sums = {d: 0.0 for d in dims}
    for p, cs, lps in zip(prompts, cands, logps):
        top = max(lps)
        weights = [math.exp(v - top) for v in lps]
        z = sum(weights)
        for d in dims:
            sums[d] += sum(w * task.rule_score(d, p, c) for w, c in zip(weights, cs)) / z
    return {d: v / max(1, len(prompts)) for d, v in sums.items()}


def score_run(run_dir: str, dims: Sequence[str], prompts: Sequence[str], *,
              expected: bool = False) -> list[dict[str, Any]]:
    """Scores of the base model and of every completed stage of a run: [{model, stage, dim, scores, responses}, ...]
    (plus `expected`, see expected_scores, when asked)."""
    from ..engine.chain import ModelChain
    from ..models import load_tokenizer
    from ..rundir import RunDir

    run = RunDir(run_dir)
    manifest = run.read_manifest()
    chain = ModelChain(manifest["base_model"], run, manifest)
    tok = load_tokenizer(manifest["base_model"])
    rows = []
    for k in range(0, len(manifest["stages"]) + 1):
        if k and manifest["stages"][k - 1].get("status") != "completed":
            break
        model = chain.load(k)
        scores, responses = score_model(model, tok, dims, prompts)
        rows.append({"model": "base" if k == 0 else f"{k} {manifest['stages'][k - 1]['dim']}", "stage": k,
                     "dim": None if k == 0 else manifest["stages"][k - 1]["dim"], "scores": scores,
                     "responses": responses})
        if expected:
            rows[-1]["expected"] = expected_scores(model, tok, dims, prompts)
    return rows
