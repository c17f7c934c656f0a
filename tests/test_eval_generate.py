"""Eval generation: batched, left-padded, length-sorted greedy decoding gives each prompt the response it gets
alone; the batches cover every prompt once; the vLLM backend is refused clearly where it cannot run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tinyworld import make_model_dir, make_tokenizer  # noqa: E402

from spoctl.config import GenerationSettings  # noqa: E402
from spoctl.evaluate.generate import generate_tokens, left_pad, length_batches  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(tok, n: int, seed: int) -> list[list[int]]:
    """Prompts of different lengths (3..17 tokens), so that every batch pads some of them."""
    g = torch.Generator().manual_seed(seed)
    low = max(tok.pad_token_id, tok.eos_token_id) + 1  # ordinary tokens: no pad or EOS inside a prompt
    return [torch.randint(low, len(tok), (int(torch.randint(3, 18, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_batched_greedy_equals_one_prompt_at_a_time(tmp_path):
    """Token for token. Why exact equality is the right bound: padding is masked out of attention (its weights
    are exactly 0 after the softmax) and position ids start at each prompt's first real token, so a padded row
    computes the same function as the row alone; what differs is only the order of floating-point sums inside
    batched matmuls, a relative error of order 1e-16 in float64. A greedy token can therefore change only where
    the top two logits are closer than that; the test measures the smallest top-1/top-2 gap of the one-at-a-time
    runs and requires it to be far above float64 rounding (1e-9), so the equality it asserts is decided by the
    model, not by luck."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = make_model_dir(tmp_path / "model", seed=3)
    tok = make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    gen = GenerationSettings(max_new_tokens=12, temperature=0.0)
    prompts = _prompts(tok, 10, seed=0)

    alone, gaps = [], []
    for p in prompts:
        alone += generate_tokens(model, tok, [p], gen, seed=0)
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 generation_config=GenerationConfig(max_new_tokens=12, do_sample=False,
                                                                    pad_token_id=tok.pad_token_id,
                                                                    eos_token_id=tok.eos_token_id),
                                 output_scores=True, return_dict_in_generate=True)
        for scores in out.scores:
            top = scores[0].topk(2).values
            gaps.append(float(top[0] - top[1]))
    assert min(gaps) > 1e-9, f"a near-tie ({min(gaps):.3g}) would make the comparison depend on rounding"
    assert any(len(t) > 0 for t in alone)

    for batch_size in (3, 4, 10):
        batched: list[list[int] | None] = [None] * len(prompts)
        for batch in length_batches([{"prompt_input_ids": p} for p in prompts], batch_size):
            for i, tokens in zip(batch, generate_tokens(model, tok, [prompts[i] for i in batch], gen, seed=0)):
                batched[i] = tokens
        assert batched == alone, f"batch size {batch_size}"


def test_length_batches_cover_every_prompt_once_longest_first():
    rows = [{"prompt_input_ids": [1] * n} for n in (3, 9, 1, 9, 5, 2, 7)]
    batches = length_batches(rows, 3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(rows))) and [len(b) for b in batches] == [3, 3, 1]
    lengths = [len(rows[i]["prompt_input_ids"]) for i in flat]
    assert lengths == sorted(lengths, reverse=True)
    assert flat[:2] == [1, 3]  # ties keep row order


def test_left_pad_right_aligns_every_prompt():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_is_the_default():
    assert GenerationSettings().temperature == 0.0 and GenerationSettings().backend == "transformers"


def test_vllm_backend_is_refused_where_it_cannot_run(monkeypatch):
    """No vLLM (this machine) or no GPU: a usage error that says what to do, before any work."""
    import importlib.util

    from spoctl.errors import UsageError
    from spoctl.evaluate.vllm_backend import check_vllm

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(UsageError) as err:
        check_vllm()
    message = str(err.value)
    assert "vLLM is not installed (pip install vllm)" in message
    assert "generation.backend=transformers" in message
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in message
