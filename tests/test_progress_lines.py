"""Issue 21's "waiting with nothing on the screen": prepare, align, eval and export with stdout not a terminal (as
in CI logs and under nohup), and every long phase -- tokenizing, each frozen pass, the forgetting view,
generation, judging, export's steps -- prints plain progress lines (count/total, rate), announces what it will do
and its size first, and each command ends with the next one to run. On a terminal the same `Output.progress`
draws a rich bar instead (tests/test_console_progress.py).

The commands run in this process (CliRunner: stdout a buffer, not a TTY, which is all `Output` asks), not as four
processes whose start alone costs half a minute; what a real process with stdout a pipe prints is checked by
tests/test_json_stdout.py and tests/test_cli.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spoctl.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from tinyworld import make_model_dir  # noqa: E402

# "LABEL: 36/36 pairs (506 pairs/s) elapsed 0s": a plain progress line of Output.progress.
PROGRESS = re.compile(r"^(?P<label>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \([\d.e+]+ \w+/s\) elapsed \d+s")


def _spoctl(*args: str) -> str:
    res = CliRunner().invoke(app, list(args), env={"NO_COLOR": "1"}, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.stdout


def _progress(out: str) -> dict[str, list[tuple[int, int, str]]]:
    """label -> [(done, total, unit), ...] in the order printed."""
    found: dict[str, list[tuple[int, int, str]]] = {}
    for line in out.splitlines():
        m = PROGRESS.match(line)
        if m:
            found.setdefault(m["label"], []).append((int(m["done"]), int(m["total"]), m["unit"]))
    return found


def _tensor_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def _finished(lines: list[tuple[int, int, str]]) -> bool:
    return bool(lines) and lines[-1][0] == lines[-1][1]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("progress")
    model = make_model_dir(root / "model")
    for dim, word in (("helpful", "sure"), ("harmless", "no")):
        with open(root / f"{dim}.jsonl", "w", encoding="utf-8") as f:
            for i in range(40):
                f.write(json.dumps({"prompt": f"question {i} about {dim}?", "chosen": f"{word} answer {i}",
                                    "rejected": f"bad {i}"}) + "\n")
    run = root / "run"
    return {
        "prepare": _spoctl("prepare", "--data", f"helpful={root / 'helpful.jsonl'}", "--data",
                           f"harmless={root / 'harmless.jsonl'}", "--model", str(model), "--out", str(root / "p")),
        # A checkpoint after step 1 of each stage (full fine-tuning: weights and Adam state), then each stage model.
        "align": _spoctl("align", "--dims", "helpful,harmless", "--data", str(root / "p"), "--max-steps", "2",
                         "--batch-size", "4", "--set", "save_every=1", "--out", str(run)),
        "eval": _spoctl("eval", str(run), "--judge", "embedding", "--num-prompts", "2", "--max-new-tokens", "4"),
        "export": _spoctl("export", "--run", str(run), "--out", str(root / "export")),
        "run": str(run),
    }


def test_prepare_says_what_it_will_do_and_shows_tokenizing(outputs):
    out = outputs["prepare"]
    assert out.splitlines()[0].startswith("preparing 2 --data entries")
    assert "tokenizing 80 pairs in 2 dimensions" in out
    bars = _progress(out)
    for dim in ("helpful", "harmless"):
        assert _finished(bars[f"{dim}: tokenizing"]) and bars[f"{dim}: tokenizing"][-1][2] == "pairs"


def test_align_shows_every_frozen_pass_the_steps_and_the_forgetting_view(outputs):
    out, bars = outputs["align"], _progress(outputs["align"])
    # Before each stage's frozen passes: how many passes over how many pairs.
    assert "stage 1 (helpful) frozen inputs: 1 frozen passes (pi_0) over 80 pairs" in out
    # pi_1 on harmless's training pairs only: stage 1's last forgetting view already scored it on the eval pairs.
    train = re.search(r"stage 2 \(harmless\) training: \d+ steps of \d+ pairs on (\d+) training pairs", out)
    assert train and f"stage 2 (harmless) frozen inputs: 1 frozen passes (pi_1) over {train.group(1)} pairs" in out
    for label in ("frozen pass pi_0 helpful/train", "frozen pass pi_0 harmless/eval", "frozen pass pi_1 harmless/train",
                  "stage1 forgetting view helpful/eval", "stage2 forgetting view harmless/eval"):
        assert _finished(bars[label]) and bars[label][-1][2] == "pairs", (label, bars.get(label))
    assert "stage 1/2 helpful step 2/2" in out and "stage 2/2 harmless step 2/2" in out
    # Before training, its size: steps of a batch on the training pairs (40 pairs, 10% of them held out).
    for n, dim in ((1, "helpful"), (2, "harmless")):
        assert f"stage {n} ({dim}) training: 2 steps of 4 pairs on 36 training pairs" in out
    assert out.rstrip().splitlines()[-1] == f"next: spoctl eval --run {outputs['run']}"


def test_align_shows_each_checkpoint_and_stage_model_write_with_its_size(outputs):
    out, bars = outputs["align"], _progress(outputs["align"])
    run = Path(outputs["run"])
    manifest = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    for n, stage in enumerate(manifest["stages"], start=1):
        # The tensor bytes of the stage model (the tiny model, full fine-tuning): each safetensors file less its
        # 8-byte header length and the JSON header.
        weights_kb = sum(_tensor_bytes(f) for f in (run / stage["checkpoint"]).glob("*.safetensors")) / 1e3
        # Announced before the write (what, how big), then a line when it is done, sized as what was written.
        assert f"writing stage {n} model: {round(weights_kb)} kB (weights and tokenizer to " in out
        assert _finished(bars[f"writing stage {n} model"])
        assert bars[f"writing stage {n} model"][-1][1:] == (round(weights_kb), "kB")
    # The checkpoint after step 1 of each stage (each stage's folder has this name): weights and Adam's two
    # moments, all float32, so about three times the weights (the step counter and the RNG are bytes).
    ckpt = bars["writing checkpoint step-000001"]
    assert _finished(ckpt) and len(ckpt) == 2, ckpt
    assert all(2.9 * weights_kb <= total <= 3.1 * weights_kb and unit == "kB" for _, total, unit in ckpt), (ckpt,
                                                                                                         weights_kb)
    assert out.count("writing checkpoint step-000001: ") == 4  # the announcement and the end line, per stage
    assert "(trainable weights and optimizer state, then their checksums)" in out


def test_eval_shows_generation_and_judging_with_the_flags_that_size_them(outputs):
    out, bars = outputs["eval"], _progress(outputs["eval"])
    assert out.splitlines()[0].startswith("generation: 3 models x 4 prompts")
    generating = [label for label in bars if label.startswith("generating: ")]
    assert len(generating) == 3 and all("--num-prompts 2, --max-new-tokens 4" in g for g in generating)
    assert all(_finished(bars[g]) and bars[g][-1][2] == "prompts" for g in generating)
    judging = [label for label in bars if label.startswith("judging")]
    assert judging and all(_finished(bars[j]) and bars[j][-1][2] == "matchups" for j in judging)
    assert "next: spoctl compare" in out and "spoctl export --run" in out


def test_export_shows_its_steps(outputs):
    bars = _progress(outputs["export"])
    assert _finished(bars["export: reference, merge, write, numerical check"])
    # The merged model's write on its own: its size first (the tiny model in bf16), then its time.
    assert "export: writing the merged model: " in outputs["export"] and "(weights in bf16, safetensors" in outputs["export"]
    assert _finished(bars["export: writing the merged model"])
    written = sum(_tensor_bytes(f) for f in (Path(outputs["run"]).parent / "export").glob("*.safetensors"))
    assert bars["export: writing the merged model"][-1][1:] == (round(written / 1e3), "kB")
