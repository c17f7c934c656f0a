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
sort_adapter_targets(model)
model.save_pretrained(sys.argv[2])
"""


def test_adapter_config_is_the_same_bytes_whatever_the_hash_seed(tmp_path: Path):
    model = make_model_dir(tmp_path / "model")
    written = []
    for seed in ("1", "2", "3"):  # 6 names: the chance that three seeds give one set order by luck is 1/720^2
        out = tmp_path / f"adapter-{seed}"
        subprocess.run([sys.executable, "-c", SAVE, str(model), str(out)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        written.append((out / "adapter_config.json").read_bytes())
    assert written[0] == written[1] == written[2]
    assert b'"down_proj",\n    "k_proj"' in written[0].replace(b"\r", b"")  # sorted, as written by json indent 2
