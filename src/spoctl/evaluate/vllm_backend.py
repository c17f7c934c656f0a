"""Eval generation with vLLM (`eval.generation.backend: vllm`): for GPUs, where vLLM's paged KV cache and
continuous batching generate many times faster than `transformers.generate`.

vLLM loads models from a folder, so each model pi_k (a plain transformers model: LoRA chains are already merged
by `ModelChain.load`) is saved to a temporary folder with the run's tokenizer, loaded, asked for every prompt at
once (vLLM schedules its own batches), and released before the next. Prompts go in as the same token ids the
transformers backend uses, and responses are decoded by the same function, so the two backends differ only in
the engine. With a temperature vLLM samples from its own seeded generator: the responses are reproducible
with vLLM, but not equal to the transformers backend's samples; greedy responses agree up to floating point.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..config import GenerationSettings
from ..errors import UsageError


def check_vllm() -> None:
    """Refuse `backend: vllm` before any work where it cannot run: vLLM missing, or no CUDA GPU."""
    import torch

    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("vLLM is not installed (pip install vllm)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        raise UsageError(f"eval.generation.backend=vllm: {' and '.join(missing)}; run on a machine with a GPU"
                         " and vLLM, or use --set generation.backend=transformers (the default)")


@contextlib.contextmanager
def model_folder(model: Any, tokenizer: Any, scratch: Path) -> Iterator[str]:
    """`model` saved (safetensors) with `tokenizer` in a temporary folder under `scratch`, removed afterwards."""
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spoctl-vllm-", dir=scratch) as folder:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        yield folder


def generate_vllm(folder: str, prompts: list[list[int]], gen: GenerationSettings, seed: int) -> list[list[int]]:
    """One response per prompt (token ids in, the new token ids out) from the model in `folder`; the caller decodes
    them as the transformers backend's responses are (generate.decode_response)."""
    import gc

    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, tokenizer=folder, seed=seed, dtype="auto")
    params = SamplingParams(temperature=gen.temperature, top_p=gen.top_p if gen.temperature > 0 else 1.0,
                            max_tokens=gen.max_new_tokens, seed=seed)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        del llm
        gc.collect()
        torch.cuda.empty_cache()
