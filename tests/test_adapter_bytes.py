"""A LoRA stage is saved as the same bytes in every process. PEFT keeps `target_modules` as a set and wrote it to
adapter_config.json in hash order, which differs between processes (PYTHONHASHSEED): two identical runs got
different stage fingerprints. `models.sort_adapter_targets` sorts it before the stage is saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tinyworld import make_model_dir

SAVE = """
import sys
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from spoctl.models import sort_adapter_targets
model = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]),
                       LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
print(",".join(model.peft_config["default"].target_modules))  # the set's own order, which the hash seed makes
sort_adapter_targets(model)
model.save_pretrained(sys.argv[2])
"""


def save_here(model: Path, out: Path) -> str:
    """SAVE in this process (its own hash seed): the set order it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    argv = sys.argv
    try:
        sys.argv = ["-c", str(model), str(out)]
        with contextlib.redirect_stdout(printed):
            exec(compile(SAVE, "<save>", "exec"), {"__name__": "__save__"})
    finally:
        sys.argv = argv
    return printed.getvalue().strip().splitlines()[-1]


def test_adapter_config_is_the_same_bytes_whatever_the_hash_seed(tmp_path: Path):
    """This process, then processes with other hash seeds until one of them holds the target set in another order
    than this one (shown, so the test is known to meet the case it is about: with 6 names, two seeds agree by
    chance about once in 720): the same bytes all the same. This process is one of the two (PEFT is imported here
    already), so the case usually costs one process with PEFT, not two."""
    model = make_model_dir(tmp_path / "model")
    orders = [save_here(model, tmp_path / "adapter-here")]
    written = [(tmp_path / "adapter-here" / "adapter_config.json").read_bytes()]
    for seed in map(str, range(1, 9)):
        out = tmp_path / f"adapter-{seed}"
        done = subprocess.run([sys.executable, "-c", SAVE, str(model), str(out)], check=True, capture_output=True,
                              text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        orders.append(done.stdout.strip().splitlines()[-1])
        written.append((out / "adapter_config.json").read_bytes())
        if len(set(orders)) > 1:
            break
    assert len(set(orders)) > 1, f"9 hash seeds gave one set order: {orders[0]}"
    assert len(set(written)) == 1
    assert b'"down_proj",\n    "k_proj"' in written[0].replace(b"\r", b"")  # sorted, as written by json indent 2
