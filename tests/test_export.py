"""`spoctl export`: round trips of real (tiny) runs made by the align engine, reloaded in a fresh Python process
that never imports spoctl; the model card, the lineage file, atomic writes, the numerical check, Hub failures."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from spoctl.cli import app
from fake_openai import JsonHandler, LocalServer
from tinyworld import make_model_dir, make_prepared

DIMS = ["helpful", "harmless"]
ALIGN = ["--dims", ",".join(DIMS), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--quiet",
         "--set", "stages.harmless.beta=0.25", "--set", "alpha=0.3"]


def cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def ok(result) -> None:
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny base model, prepared data, and two real runs of the align engine: full fine-tuning and LoRA."""
    root = tmp_path_factory.mktemp("export-world")
    model = make_model_dir(root / "base")
    prepared = make_prepared(root / "prepared", model, DIMS)
    for name, extra in (("full", ["--full"]), ("lora", ["--lora", "--set", "lora.r=4"])):
        ok(cli("align", *ALIGN, *extra, "--data", prepared, "--out", root / name))
    return {"root": root, "base": model, "prepared": prepared, "full": root / "full", "lora": root / "lora"}


@pytest.fixture(scope="module")
def exports(world) -> dict[str, Path]:
    """The exports most tests inspect, made once."""
    out = world["root"] / "exports"
    made = {
        "full": ("--run", world["full"], "--dtype", "fp32", "--max-shard-size", "60KB"),
        "lora": ("--run", world["lora"], "--dtype", "fp32"),
        "lora_bf16": ("--run", world["lora"], "--stage", "harmless"),
        "adapter": ("--run", world["lora"], "--adapter-only"),
        "stage1": ("--run", world["lora"], "--stage", "1", "--dtype", "fp16", "--set", "base_model_id=acme/tiny-base"),
    }
    for name, args in made.items():
        ok(cli("export", *args, "--out", out / name, "--quiet"))
    return {name: out / name for name in made}


def safetensors_dtypes(folder: Path) -> set[str]:
    """Tensor dtypes straight from the safetensors headers (no torch, no transformers)."""
    found = set()
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


FRESH = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel

    job = json.loads(sys.argv[1])
    report = {}
    ids = None
    for folder in job["merged"]:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        enc = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
        report[folder] = {"dtype": str(model.dtype), "new_tokens": gen.shape[1] - enc["input_ids"].shape[1],
                          "chat_template": bool(tok.chat_template)}
    # The adapter export, rebuilt with plain PEFT as its card says, equals the merged fp32 export.
    a = job["adapter"]
    model = AutoModelForCausalLM.from_pretrained(a["base"])
    for name in a["earlier"]:
        model = PeftModel.from_pretrained(model, a["folder"] + "/" + name).merge_and_unload()
    model = PeftModel.from_pretrained(model, a["folder"]).merge_and_unload().eval()
    merged = AutoModelForCausalLM.from_pretrained(a["merged"]).eval()
    x = torch.arange(3, 40)[None]
    with torch.no_grad():
        report["adapter_max_diff"] = float((model(x).logits - merged(x).logits).abs().max())
    report["spoctl_imported"] = any(m == "spoctl" or m.startswith("spoctl.") for m in sys.modules)
    print(json.dumps(report))
""")


def run_fresh(job: dict, cwd: Path) -> dict:
    """Python with a clean environment from a folder outside the repository: spoctl is never imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    res = subprocess.run([sys.executable, "-c", FRESH, json.dumps(job)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_exports_reload_and_generate_in_a_fresh_process_without_spoctl(world, exports):
    merged = [exports["full"], exports["lora"], exports["lora_bf16"], exports["stage1"]]
    lin = json.loads((exports["adapter"] / "spoctl_lineage.json").read_text())
    report = run_fresh({"merged": [str(m) for m in merged],
                        "adapter": {"folder": str(exports["adapter"]), "base": str(world["base"]),
                                    "earlier": lin["export"]["apply_order"][:-1], "merged": str(exports["lora"])}},
                       cwd=world["root"])
    assert report.pop("spoctl_imported") is False
    assert report.pop("adapter_max_diff") < 1e-4
    for folder, r in report.items():
        assert r["new_tokens"] > 0 and r["chat_template"], folder
    assert report[str(exports["full"])]["dtype"] == "torch.float32"
    assert report[str(exports["lora_bf16"])]["dtype"] == "torch.bfloat16"
    assert report[str(exports["stage1"])]["dtype"] == "torch.float16"


def test_sharding_dtype_and_files(exports):
    full = exports["full"]
    index = json.loads((full / "model.safetensors.index.json").read_text())
    shards = sorted(full.glob("model-*.safetensors"))
    assert len(shards) > 1 and {Path(v).name for v in index["weight_map"].values()} == {s.name for s in shards}
    assert all(s.stat().st_size <= 60_000 + 40_000 for s in shards)  # one tensor may exceed the limit alone
    assert safetensors_dtypes(full) == {"F32"}
    assert safetensors_dtypes(exports["lora_bf16"]) == {"BF16"}
    assert safetensors_dtypes(exports["stage1"]) == {"F16"}
    for name in ("full", "lora", "lora_bf16"):
        files = {p.name for p in exports[name].iterdir()}
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                "spoctl_lineage.json"} <= files, name
        assert not any(f.startswith("adapter") or f == "spoctl_stage.json" for f in files), name
    gen = json.loads((exports["lora"] / "generation_config.json").read_text())
    assert gen["pad_token_id"] is not None and gen["eos_token_id"] is not None
    assert oct((exports["full"] / "config.json").stat().st_mode)[-3:] != "600"  # shareable, not a private temp


def test_model_card_states_base_dims_betas_weights_and_data(world, exports):
    text = (exports["lora"] / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "transformers" and "spoctl" in meta["tags"] and "lora" in meta["tags"]
    assert "base_model" not in meta  # a local base: not a Hub id, named in the text instead
    manifest = json.loads((world["lora"] / "manifest.json").read_text())
    assert f"- **Base model:** `base` (a local model; weights fingerprint `{manifest['base_fingerprint'][:16]}`)" in text
    assert "`helpful` → `harmless`" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert rows[0].startswith("| 1 | helpful | 0.1 | — | 24 | 8 |")
    assert rows[1].startswith("| 2 | harmless | 0.25 | helpful: 0.3 | 24 | 8 |")
    assert "| helpful | `synthetic` | — | pairwise | 24 | 8 |" in text
    assert "## Evaluation" not in text  # no eval report in this run
    # huggingface_hub reads the card back: its metadata is what the Hub will show.
    from huggingface_hub import ModelCard

    card = ModelCard.load(exports["lora"] / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    # Stage 1 of the run: one dimension, the rest named as not included; a given Hub id becomes base_model.
    s1 = (exports["stage1"] / "README.md").read_text()
    assert yaml.safe_load(s1.split("---\n")[1])["base_model"] == "acme/tiny-base"
    assert "stage 1 of 2" in s1 and "`harmless`, not included" in s1
    ad = (exports["adapter"] / "README.md").read_text()
    assert yaml.safe_load(ad.split("---\n")[1])["library_name"] == "peft"
    assert "earlier_adapters/01-helpful" in ad and "names no base model" in ad
    assert 'from_pretrained("BASE_MODEL")  # base, the run\'s base model' in ad


def test_no_file_of_an_export_names_a_path_of_this_machine(world, exports):
    """The card, the lineage file, adapter configs, tokenizer files: nothing may hold an absolute local path."""
    local = {str(world["root"]), str(world["root"].resolve()), str(Path.cwd()), str(Path.home()), sys.prefix}
    checked = 0
    for folder in exports.values():
        for f in folder.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                for path in local:
                    assert path.encode() not in data, (f, path)
                checked += 1
    assert checked > 30
    lin = json.loads((exports["adapter"] / "spoctl_lineage.json").read_text())
    assert lin["run"]["name"] == "lora" and lin["base_model"]["name"] == "base"
    assert lin["data"]["prepared_dir"] == "prepared"
    assert lin["data"]["sources"]["helpful"] == {"name": "synthetic", "hub_id": "synthetic", "sha256": None,
                                                 "format": "pairwise"}


def test_portable_names():
    from spoctl.export.provenance import portable_path, source_entry

    assert portable_path("/home/me/data/hh/train.jsonl.gz") == "train.jsonl.gz"
    assert portable_path("../elsewhere/x.jsonl") == "x.jsonl"
    assert portable_path("~/x.jsonl") == "x.jsonl"
    assert portable_path("data/hh/train.jsonl") == "data/hh/train.jsonl"  # relative, as the user typed it
    local = source_entry({"source": "/abs/hh/train.jsonl.gz", "source_kind": "file", "format": "hh-rlhf",
                          "hashes": {"source": "ab" * 32}})
    assert local == {"name": "train.jsonl.gz", "hub_id": None, "sha256": "ab" * 32, "format": "hh-rlhf"}
    hub = source_entry({"source": "Anthropic/hh-rlhf", "source_kind": "hub", "format": "hh-rlhf", "hashes": {}})
    assert hub["name"] == hub["hub_id"] == "Anthropic/hh-rlhf"


def test_lineage_hashes(world, exports):
    manifest = json.loads((world["lora"] / "manifest.json").read_text())
    for name in ("lora", "adapter"):
        folder = exports[name]
        lin = json.loads((folder / "spoctl_lineage.json").read_text())
        on_disk = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in folder.rglob("*") if p.is_file() and p.name != "spoctl_lineage.json"}
        assert lin["files"] == on_disk and len(on_disk) >= 6
        assert lin["data"]["hashes"] == manifest["data_hashes"]
        assert [s["fingerprint"] for s in lin["stages"]] == [s["fingerprint"] for s in manifest["stages"]]
        assert [s["data_hashes"] for s in lin["stages"]] == [s["data_hashes"] for s in manifest["stages"]]
        assert lin["base_model"]["fingerprint"] == manifest["base_fingerprint"]
        assert lin["exported_stage"] == {"index": 2, "dim": "harmless"}
        assert lin["check"]["passed"] and lin["check"]["source"] == "prepared:harmless/eval"
        # What the export read, hashed from the files: the base model and both stages' adapters (a LoRA chain).
        assert set(lin["inputs"]) == {"base_model", "stages/01-helpful/model", "stages/02-harmless/model"}
        for key, files in lin["inputs"].items():
            src = world["base"] if key == "base_model" else world["lora"] / key
            assert files == {f: hashlib.sha256((src / f).read_bytes()).hexdigest() for f in files}
            want = {"model.safetensors", "config.json"} if key == "base_model" else {"adapter_model.safetensors"}
            assert want <= set(files), key
    full = json.loads((exports["full"] / "spoctl_lineage.json").read_text())
    assert set(full["inputs"]) == {"stages/02-harmless/model"}  # full weights: only the stage itself is read
    assert "model.safetensors" in full["inputs"]["stages/02-harmless/model"]
    adapter = json.loads((exports["adapter"] / "spoctl_lineage.json").read_text())
    assert adapter["export"]["apply_order"] == ["earlier_adapters/01-helpful", "."]
    assert json.loads((exports["adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    first = json.loads((exports["adapter"] / "earlier_adapters/01-helpful/adapter_config.json").read_text())
    assert first["base_model_name_or_path"] == "base"  # the base's name, not this machine's path to it


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_refuses_non_empty_out_without_force_and_replaces_an_export_with_it(world, exports, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(exports["full"], out)
    (out / "notes.txt").write_text("mine")
    r = cli("export", "--run", world["full"], "--out", out, "--stage", "1", "--dtype", "fp32")
    assert r.exit_code == 2 and "--force" in r.output
    assert (out / "notes.txt").exists()
    # An earlier export (it holds spoctl_lineage.json) is what --force replaces.
    ok(cli("export", "--run", world["full"], "--out", out, "--stage", "1", "--dtype", "fp32", "--force", "--quiet"))
    assert not (out / "notes.txt").exists() and (out / "config.json").exists()
    assert json.loads((out / "spoctl_lineage.json").read_text())["exported_stage"]["index"] == 1
    assert leftovers(tmp_path) == []
    # An empty folder is fine without --force.
    empty = tmp_path / "empty"
    empty.mkdir()
    ok(cli("export", "--run", world["full"], "--out", empty, "--stage", "1", "--dtype", "fp32", "--quiet"))


def test_force_replaces_nothing_but_an_earlier_export(world, exports, tmp_path):
    """Issue 11.2: with --force, every folder that export did not produce is refused (exit 2) and left as it was."""
    other_run = tmp_path / "other-run"
    shutil.copytree(world["lora"], other_run)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "thesis.tex").write_text("years of work")
    fake_lineage = tmp_path / "fake-lineage"
    fake_lineage.mkdir()
    (fake_lineage / "spoctl_lineage.json").write_text("not ours")
    export_with_run = tmp_path / "export-with-run"
    shutil.copytree(exports["full"], export_with_run)
    shutil.copytree(world["full"], export_with_run / "my-run")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {
        "another run": (other_run, "not a folder `spoctl export` wrote"),
        "the run being read": (world["full"], "would overwrite the run directory"),
        "the base model": (world["base"], "would overwrite the base model"),
        "the prepared data": (world["prepared"], "would overwrite the prepared data"),
        "a folder holding the run": (world["root"], "would overwrite the run directory"),
        "a stage folder of the run": (world["full"] / "stages" / "01-helpful", "inside the run's stage folders"),
        "an ordinary folder": (plain, "not a folder `spoctl export` wrote"),
        "a broken lineage file": (fake_lineage, "not a folder `spoctl export` wrote"),
        "an export holding a run": (export_with_run, "holds a spoctl run or prepared data"),
        "a file": (a_file, "is not a folder"),
    }
    before = {name: tree(p) if p.is_dir() else p.read_bytes() for name, (p, _) in cases.items()}
    for name, (target, message) in cases.items():
        r = cli("export", "--run", world["full"], "--out", target, "--stage", "1", "--dtype", "fp32", "--force")
        assert r.exit_code == 2, (name, r.output)
        assert message in r.output, (name, r.output)
        after = tree(target) if target.is_dir() else target.read_bytes()
        assert after == before[name], name
    assert leftovers(tmp_path) == [] and leftovers(world["root"]) == []


def test_numerical_check_catches_a_wrong_merge(world, exports, tmp_path, monkeypatch):
    """Skipping the last adapter while merging must fail the export and leave nothing behind (nor touch an old
    export being replaced with --force)."""
    import spoctl.export.build as build

    real = build.apply_adapter
    last = world["lora"] / "stages" / "02-harmless" / "model"
    monkeypatch.setattr(build, "apply_adapter", lambda model, d: model if Path(d) == last else real(model, d))
    out = tmp_path / "bad"
    r = cli("export", "--run", world["lora"], "--out", out, "--dtype", "fp32")
    assert r.exit_code == 1 and "numerical check failed" in r.output
    assert not out.exists() and leftovers(tmp_path) == []
    old = tmp_path / "old"
    shutil.copytree(exports["lora"], old)
    before = tree(old)
    r = cli("export", "--run", world["lora"], "--out", old, "--dtype", "fp32", "--force")
    assert r.exit_code == 1 and tree(old) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("run_name,weights", [("full", "model.safetensors"), ("lora", "adapter_model.safetensors")])
def test_a_stage_model_changed_after_its_run_is_not_exported(world, tmp_path, run_name, weights):
    """A stage model edited behind spoctl's back must not be exported with the run's (now false) fingerprint."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(world[run_name], run)
    path = run / "stages" / "02-harmless" / "model" / weights
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(path), metadata={"format": "pt"})
    r = cli("export", "--run", run, "--out", tmp_path / "out", "--dtype", "fp32")
    assert r.exit_code == 2, r.output
    assert weights in r.output and "02-harmless" in r.output
    assert not (tmp_path / "out").exists()


class FakeHub(LocalServer):
    """Just enough of the Hub's HTTP API on 127.0.0.1: whoami-v2 answers for one token (with a role), and
    creating a repository fails with a 500, so an upload fails after the token check passed."""

    def __init__(self, token: str, role: str = "write"):
        self.token, self.role = token, role
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header) of every request
        hub = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                hub.requests.append((self.path, self.headers.get("Authorization")))
                if self.path != "/api/whoami-v2":
                    return self._send(404, {"error": "no such route"})
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                return self._send(200, {"type": "user", "name": "someone",
                                        "auth": {"type": "access_token", "accessToken": {"role": hub.role}}})

            def do_POST(self) -> None:
                hub.requests.append((self.path, self.headers.get("Authorization")))
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                return self._send(500, {"error": "storage is down"})

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def seen(self) -> list[tuple[str, str | None]]:
        """The requests about this upload (huggingface_hub also fetches a registry of AI-agent names, daily)."""
        return [r for r in self.requests if r[0] != "/api/agent-harnesses"]


HUB_TOKEN = "hf_secret_test_token_0123456789"


@pytest.fixture
def no_stored_token(tmp_path, monkeypatch):
    """In this process: no token file (huggingface_hub reads its path once, at import) and online."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-hf-home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["offline", "no token", "unreachable", "refused", "read-only"])
def test_push_to_hub_checks_the_token_before_exporting(world, tmp_path, no_stored_token, case):
    """Every way the upload cannot happen is found before the export starts: exit 2, nothing written."""
    out = tmp_path / "pushed"
    env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": HUB_TOKEN}
    with FakeHub("another-token" if case == "refused" else HUB_TOKEN,
                 role="read" if case == "read-only" else "write") as hub:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}" if case == "unreachable" else hub.url
        if case == "offline":
            env["HF_HUB_OFFLINE"] = "1"
        if case == "no token":
            env["HF_TOKEN"] = None
        r = cli("export", "--run", world["lora"], "--stage", "1", "--out", out, "--dtype", "fp32",
                "--push-to-hub", "someone/tiny-spo", env=env)
    assert r.exit_code == 2, r.output
    expected = {"offline": "offline (HF_HUB_OFFLINE is set)", "no token": "no Hugging Face token",
                "unreachable": "cannot check the token with the Hub", "refused": "refused the token (HTTP 401)",
                "read-only": "the token is read-only"}[case]
    assert expected in r.output and "nothing was exported" in r.output
    assert not out.exists() and leftovers(tmp_path) == []
    assert HUB_TOKEN not in r.output
    assert all(path == "/api/whoami-v2" for path, _ in hub.seen)  # nothing but the check was sent


def test_upload_failure_keeps_the_local_export(world, tmp_path, no_stored_token):
    out = tmp_path / "pushed"
    with FakeHub(HUB_TOKEN) as hub:
        r = cli("export", "--run", world["lora"], "--stage", "1", "--out", out, "--dtype", "fp32",
                "--push-to-hub", "someone/tiny-spo", env={"HF_HUB_OFFLINE": "0", "HF_TOKEN": HUB_TOKEN,
                                                          "HF_ENDPOINT": hub.url})
    assert r.exit_code == 2, r.output
    assert "the token of someone can upload" in r.output and "upload failed" in r.output
    assert "local export" in r.output and str(out) in r.output
    assert hub.seen[0] == ("/api/whoami-v2", f"Bearer {HUB_TOKEN}") and len(hub.seen) > 1
    assert (out / "config.json").exists() and (out / "spoctl_lineage.json").exists()
    assert HUB_TOKEN not in r.output
    assert all(HUB_TOKEN.encode() not in f.read_bytes() for f in out.rglob("*") if f.is_file())


def test_push_to_hub_uses_the_token_hf_auth_login_stored(world, tmp_path):
    """A real `spoctl export` process with HF_HOME holding a stored token (what `hf auth login` writes) and no
    HF_TOKEN: the token is found, checked with the Hub before exporting, used, and never shown. (No token at all:
    test_push_to_hub_checks_the_token_before_exporting[no token]; the token file is the only place this token is
    written, so a process that reads another path fails here.)"""
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text(HUB_TOKEN)
    base_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME")}
    base_env.update(HF_HUB_OFFLINE="0", TRANSFORMERS_VERBOSITY="error")

    def export(out: Path, hf_home: Path, endpoint: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "spoctl", "export", "--run", str(world["lora"]), "--stage", "1",
                               "--out", str(out), "--dtype", "fp32", "--push-to-hub", "someone/tiny-spo"],
                              env={**base_env, "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint},
                              capture_output=True, text=True, timeout=600)

    with FakeHub(HUB_TOKEN) as hub:
        res = export(tmp_path / "out", home, hub.url)
    assert res.returncode == 2, res.stderr[-2000:]
    assert hub.seen[0] == ("/api/whoami-v2", f"Bearer {HUB_TOKEN}")
    assert "upload failed" in res.stderr and (tmp_path / "out" / "spoctl_lineage.json").exists()
    assert HUB_TOKEN not in res.stdout + res.stderr
    assert all(HUB_TOKEN.encode() not in f.read_bytes() for f in (tmp_path / "out").rglob("*") if f.is_file())


def test_run_and_stage_errors(world, tmp_path):
    r = cli("export", "--run", tmp_path, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "not a spoctl run directory" in r.output
    r = cli("export", "--run", world["full"], "--out", tmp_path / "x", "--adapter-only")
    assert r.exit_code == 2 and "no adapters" in r.output
    r = cli("export", "--run", world["full"], "--out", tmp_path / "x", "--stage", "7")
    assert r.exit_code == 2 and "stages 1 to 2" in r.output
    r = cli("export", "--run", world["full"], "--out", tmp_path / "x", "--stage", "honest")
    assert r.exit_code == 2 and "helpful, harmless" in r.output
    r = cli("export", "--run", world["full"], "--out", tmp_path / "x", "--max-shard-size", "lots")
    assert r.exit_code == 2 and "max_shard_size" in r.output
    # A stage that has not completed: refused by name; `last` falls back to the last completed one, with a warning.
    run = tmp_path / "partial"
    shutil.copytree(world["full"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"][1]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    r = cli("export", "--run", run, "--out", tmp_path / "x", "--stage", "harmless")
    assert r.exit_code == 2 and "has not completed" in r.output
    r = cli("export", "--run", run, "--out", tmp_path / "x", "--dtype", "fp32", "--json")
    assert r.exit_code == 0, r.output
    assert "exporting stage 1" in r.output and not (tmp_path / "x" / "x").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_without_prepared_data_the_check_uses_fixed_sequences_and_the_card_says_unknown(world, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(world["lora"], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["data"] = str(tmp_path / "gone")
    (run / "manifest.json").write_text(json.dumps(manifest))
    # An eval report, when `spoctl eval` has run, becomes the card's Evaluation section.
    (run / "eval").mkdir()
    cell = {"vs_base": {"accuracy": 0.75}, "implicit_reward": {"accuracy": 0.625}}
    (run / "eval" / "report.json").write_text(json.dumps({"dims": DIMS, "scorecard": [
        {"k": 0, "model": "base", "dims": {d: {"logp": {"accuracy": 0.5}} for d in DIMS}},
        {"k": 2, "model": "harmless", "dims": {d: cell for d in DIMS}}]}))
    r = cli("export", "--run", run, "--out", tmp_path / "out", "--dtype", "fp32", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["check"]["source"] == "fixed sequences" and result["check"]["passed"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "unknown (prepared data no longer available)" in card and "| 24 | 8 |" in card
    assert "## Evaluation" in card and "| 2 harmless | 75.0% (r 62.5%) | 75.0% (r 62.5%) |" in card
    # Progress of the long steps, on stderr under --json (the captured output is not a terminal: plain lines).
    assert "export: reference, merge, write, numerical check: 4/4 steps" in r.stderr


def test_the_card_shows_the_latest_complete_evaluation(world, tmp_path):
    """Eval history: eval/latest.json names the latest evaluation and the latest complete one; an evaluation
    that stopped half-way does not replace the card's numbers."""
    from spoctl.rundir import RunDir

    run = tmp_path / "evaluated"
    shutil.copytree(world["lora"], run)
    rd = RunDir(run)

    def evaluation(accuracy: float, complete: bool) -> None:
        files = rd.new_eval()
        cell = {"vs_base": {"accuracy": accuracy}, "implicit_reward": {"accuracy": accuracy}}
        files.report_path.write_text(json.dumps({"dims": DIMS, "complete": complete, "eval_id": files.eval_id,
                                                 "scorecard": [{"k": 2, "model": "harmless",
                                                                "dims": {d: cell for d in DIMS}}]}))
        rd.point_to_eval(files, complete=complete)

    evaluation(0.25, True)
    evaluation(0.75, True)
    kept = rd.latest_eval(complete=True)
    evaluation(0.5, False)
    assert rd.latest_eval().eval_id != kept.eval_id
    r = cli("export", "--run", run, "--out", tmp_path / "out", "--dtype", "fp32", "--quiet")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 2 harmless | 75.0% (r 75.0%) | 75.0% (r 75.0%) |" in card
    assert f"eval/{kept.eval_id}/report.json" in card


def test_print_config_and_set(world):
    r = cli("export", "--run", world["lora"], "--set", "check_pairs=2", "--max-shard-size", "1GB", "--print-config")
    ok(r)
    cfg = yaml.safe_load(r.output)["export"]
    assert cfg["check_pairs"] == 2 and cfg["max_shard_size"] == "1GB" and cfg["stage"] == "last"
