"""A tiny, fully local world for engine tests: a byte-level tokenizer, a randomly initialised Llama saved as a
Hugging Face folder (safetensors), and prepared preference data written in the real prepared-data format."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from spoctl.data.store import FORMAT_VERSION, features, split_hash
from spoctl.models import tokenizer_identity

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|end|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model_dir(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, tied: bool = False,
                   vocab_size: int | None = None) -> Path:
    """`tied`: input embedding and output head share one weight (tie_word_embeddings, as SmolLM2, Qwen2.5 and
    Llama-3.2 have). `vocab_size`: embedding rows (default: the tokenizer's size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def make_prepared(path: Path, model_dir: Path, dims: list[str], *, n_train: int = 24, n_eval: int = 8,
                  seed: int = 0) -> Path:
    """Random token pairs per dimension, in the exact on-disk format `spoctl prepare` writes."""
    import datasets

    from spoctl.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    g = torch.Generator().manual_seed(seed)
    manifest = {"format_version": FORMAT_VERSION, "model": str(model_dir), "tokenizer": tokenizer_identity(tok, str(model_dir)),
                "dimensions": {}}

    def seq(lo: int, hi: int) -> list[int]:
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(0, 250, (k,), generator=g).tolist()

    for d in dims:
        hashes = {}
        for split, n in (("train", n_train), ("eval", n_eval)):
            rows = {"pair_id": [], "prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [],
                    "prompt": [], "chosen": [], "rejected": [], "prompt_messages": []}
            for i in range(n):
                p, c, r = seq(3, 12), seq(2, 8) + [tok.eos_token_id], seq(2, 8) + [tok.eos_token_id]
                rows["pair_id"].append(f"{d}-{split}-{i}")
                rows["prompt_input_ids"].append(p)
                rows["chosen_input_ids"].append(c)
                rows["rejected_input_ids"].append(r)
                rows["prompt"].append(tok.decode(p))
                rows["chosen"].append(tok.decode(c))
                rows["rejected"].append(tok.decode(r))
                rows["prompt_messages"].append(json.dumps([{"role": "user", "content": tok.decode(p)}]))
            datasets.Dataset.from_dict(rows, features=features()).save_to_disk(str(path / d / split))
            hashes[split] = split_hash(rows["pair_id"], rows["prompt_input_ids"], rows["chosen_input_ids"],
                                       rows["rejected_input_ids"])
        manifest["dimensions"][d] = {"source": "synthetic", "format": "pairwise", "hashes": hashes,
                                     "counts": {"train": n_train, "eval": n_eval}}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return path


def make_world(root: Path, dims: list[str]) -> tuple[Path, Path, Path]:
    """(root, a tiny model folder, data prepared for it with `dims`): the inputs most engine tests share."""
    model = make_model_dir(root / "model")
    return root, model, make_prepared(root / "prepared", model, dims)


def checkpoints(folder: Path) -> list[Path]:
    """The `step-N` checkpoints in a stage's checkpoints folder, oldest first ([] while there is none)."""
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-")) if folder.is_dir() else []


def poll_until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll `done()` every 5 ms until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.time() + timeout
    while not done():
        if time.time() > deadline:
            return False
        time.sleep(0.005)
    return True


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds, or when it has ended or `timeout` passed."""
    poll_until(lambda: proc.poll() is not None or ready(), timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def stop_in_process(args: list[str], ready: Callable[[], bool], sig: signal.Signals = signal.SIGTERM,
                    timeout: float = 1500) -> tuple[int, str]:
    """`spoctl ARGS` in this process (CliRunner), sent `sig` from another thread as soon as `ready()` holds: spoctl
    stops at the next step boundary with a checkpoint, as a process of its own does (the runs after a real kill:
    tests/test_resume_matrix.py, tests/chaos.py). (exit code, output). Between commands this process ignores the
    signal, so one sent just as the command ended changes nothing."""
    import os
    import threading

    from typer.testing import CliRunner

    from spoctl.cli import app

    ignored = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGHUP)}
    over = threading.Event()

    def send() -> None:
        if poll_until(lambda: over.is_set() or ready(), timeout) and not over.is_set():
            os.kill(os.getpid(), sig)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    finally:
        over.set()
        sender.join(60)
        for s, handler in ignored.items():
            signal.signal(s, handler)
    return result.exit_code, result.output
