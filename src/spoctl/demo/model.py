"""The demo's base model pi_0: a byte-level BPE tokenizer and a tiny Llama, trained by SFT on the demo task.

Both are standard Hugging Face objects saved as a model folder (safetensors), so everything downstream
(`prepare`, `align`, `eval`, `export`) runs its real code path on them. The build is deterministic (seeded data
order and initialisation, fixed step count) and takes well under a minute on two CPU cores; the folder is cached
under a key of the task version, seed and step count, and reused.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

from ..console import Output
from ..fsutil import atomic_directory, write_json_atomic
from . import task

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|end|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
INFO_FILE = "spoctl_demo.json"

# Architecture and SFT schedule (115K parameters). Small enough to train in ~30 s on a busy 2-core machine, big
# enough to memorise the task's facts and its response formats.
VOCAB_SIZE = 512
ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=128)
SFT_STEPS = 600
SFT_BATCH = 32
SFT_LR = 3e-3


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread for the tiny demo model: its matrices are too small for intra-op parallelism to pay,
    and on a busy 2-core machine extra threads oversubscribe the CPU (measured: 25x slower SFT steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_tokenizer():
    """Byte-level BPE trained on the task's own text: any text round-trips, and task words are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(f"{task.TASK_NAME}/tokenizer")
    corpus = []
    for prompt in task.all_prompts():
        corpus.append(prompt)
        corpus.extend(task.candidates(prompt, rng))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def prompt_ids(tok: Any, prompt: str) -> list[int]:
    """The prompt exactly as `spoctl prepare` renders it: chat template with the generation prompt, no extra
    special tokens (the template brings its own)."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def _encode_sft(tok: Any, examples: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example; labels are -100 on the prompt, so SFT learns the responses only."""
    out = []
    for ex in examples:
        p = prompt_ids(tok, ex["prompt"])
        r = tok(ex["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p + r, [-100] * len(p) + r))
    return out


def build_base_model(target: Path, *, seed: int = 0, steps: int = SFT_STEPS, out: Output | None = None) -> Path:
    """Train the demo base model and save it (with its tokenizer) to `target`, atomically."""
    with single_thread():
        return _build(target, seed=seed, steps=steps, out=out)


def _build(target: Path, *, seed: int, steps: int, out: Output | None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    tok = build_tokenizer()
    examples = task.sft_examples(task.all_prompts(), seed=seed)
    encoded = _encode_sft(tok, examples)

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, **ARCH)
    model = LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    for step in range(steps):
        if len(order) < SFT_BATCH:  # reshuffle each epoch with the seeded generator
            order += torch.randperm(len(encoded), generator=gen).tolist()
        idx, order = order[:SFT_BATCH], order[SFT_BATCH:]
        ids, labels, mask = _collate([encoded[i] for i in idx], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if out is not None and (step + 1) % 100 == 0:
            out.detail(f"demo base model: SFT step {step + 1}/{steps}, loss {sum(losses[-100:]) / 100:.3f}")
    model.eval()

    info = {"task": task.TASK_NAME, "task_version": task.TASK_VERSION, "seed": seed, "sft_steps": steps,
            "sft_examples": len(examples), "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
            "seconds": round(time.perf_counter() - t0, 1)}
    with atomic_directory(target, replace=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        write_json_atomic(tmp / INFO_FILE, info)
    return target


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def base_model_key(seed: int, steps: int) -> str:
    return f"base-v{task.TASK_VERSION}-seed{seed}-steps{steps}"


def ensure_base_model(home: Path, *, seed: int = 0, steps: int = SFT_STEPS, out: Output | None = None) -> Path:
    """The cached base model folder for (task version, seed, steps), built first if missing."""
    target = Path(home) / base_model_key(seed, steps)
    if (target / INFO_FILE).is_file():
        return target
    if out is not None:
        out.info(f"building the demo base model (SFT, {steps} steps, seed {seed}) in {target}")
    build_base_model(target, seed=seed, steps=steps, out=out)
    if out is not None:
        info = json.loads((target / INFO_FILE).read_text(encoding="utf-8"))
        out.info(f"demo base model: {info['parameters']:,} parameters, SFT loss {info['final_loss']}, "
                 f"built in {info['seconds']}s")
    return target
