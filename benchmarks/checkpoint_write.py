"""How long `align` takes to write a mid-stage checkpoint of full fine-tuning: spoctl's writer against
torch.distributed.checkpoint's (DCP's) HuggingFaceStorageWriter, which spoctl used before and still uses for FSDP's
sharded state. Same process, same state, interleaved (DCP, spoctl, DCP, spoctl, ...), each write timed whole:
the state files, the RNG file, the checksums and the rename into place (`engine.checkpoint.save_checkpoint`).

The state is SmolLM2-135M's shape (30 layers, hidden 576, vocabulary 49,152, tied embeddings; random weights: the
bytes are what is timed) in float32, after one AdamW step: weights and two moments, 1.6 GB.

    .venv/bin/python benchmarks/checkpoint_write.py                 # 5 rounds, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/checkpoint_write.py --layers 4 --repeats 3 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class _Schedule:  # save_checkpoint records the scheduler's state; a constant learning rate has none
    def state_dict(self) -> dict:
        return {}


def _state(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model(torch.randint(0, 1000, (1, 8))).logits.sum().backward()
    optimizer.step()
    return model, optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    p.add_argument("--repeats", type=int, default=5, help="rounds, each one write per side")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    a = p.parse_args()

    from spoctl.engine import checkpoint
    from spoctl.engine.processes import Processes
    from spoctl.models import tensor_bytes

    model, optimizer = _state(a.layers)
    flat, _ = checkpoint._flat_state(model, optimizer)
    size = tensor_bytes(flat.values())
    spoctl_writes_sharded = checkpoint._sharded
    root = Path(tempfile.mkdtemp(prefix="spoctl-ckpt-bench-", dir=a.dir))
    times: dict[str, list[float]] = {"dcp": [], "spoctl": []}
    try:
        for i in range(a.repeats):
            for side in ("dcp", "spoctl"):
                # The DCP side: spoctl's own path for sharded state, taken for every state.
                checkpoint._sharded = (lambda flat: True) if side == "dcp" else spoctl_writes_sharded
                folder = root / f"step-{i:06d}-{side}"
                start = time.perf_counter()
                checkpoint.save_checkpoint(folder, procs=Processes(), scorer=model, optimizer=optimizer,
                                           scheduler=_Schedule(), meta={"step": i}, keep_last=0)
                times[side].append(time.perf_counter() - start)
                assert checkpoint.verify_checkpoint(folder, Processes()) == [], folder
                shutil.rmtree(folder)
                print(f"round {i + 1} {side:>6}: {times[side][-1]:.2f} s", flush=True)
    finally:
        checkpoint._sharded = spoctl_writes_sharded
        shutil.rmtree(root, ignore_errors=True)

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"

    ratios = [d / s for d, s in zip(times["dcp"], times["spoctl"])]
    print(f"checkpoint of {size / 1e9:.2f} GB (SmolLM2-135M shape, {a.layers} layers, fp32 weights + AdamW moments); "
          f"{a.repeats} interleaved rounds; median (min-max); {os.cpu_count()} CPUs")
    print(f"DCP HuggingFaceStorageWriter  {med(times['dcp'])}")
    print(f"spoctl                        {med(times['spoctl'])}")
    print(f"DCP / spoctl: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}), median of "
          "per-round ratios")
    if a.out:
        a.out.write_text(json.dumps({"bytes": size, "layers": a.layers, "seconds": times, "ratios": ratios},
                                    indent=2) + "\n")


if __name__ == "__main__":
    main()
