"""`spoctl eval` on a real (tiny) run made by the real engine: the scorecard against a direct computation, the
report files, the CI gate's exit codes, incomplete runs, and judged win rates end to end (the OpenAI-compatible
judge on a local server, a tiny reward model), with the partial report kept when a judge is unreachable."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402
from tinyworld import make_model_dir, make_prepared, make_tokenizer  # noqa: E402

from spoctl import losses  # noqa: E402
from spoctl.cli import app  # noqa: E402
from spoctl.config import AlignConfig, EvalConfig  # noqa: E402
from spoctl.console import Output  # noqa: E402
from spoctl.rundir import RunDir  # noqa: E402

DIMS = ["helpful", "harmless"]
KEY = "sk-eval-test-secret-42"
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A two-stage run (previous mode, alpha 0.5) of 2 steps per stage on the tiny model and data; built once."""
    from spoctl.engine.align import align

    root = tmp_path_factory.mktemp("evalworld")
    model = make_model_dir(root / "model")
    prepared = make_prepared(root / "prepared", model, DIMS, n_train=16, n_eval=8)
    cfg = AlignConfig(dims=DIMS, data=prepared, out=root / "run", max_steps=2, batch_size=4, micro_batch_size=4,
                      beta=0.5, alpha=0.5, learning_rate=5e-3)
    align(cfg, Output(quiet=True))
    return {"root": root, "model": model, "prepared": prepared, "run": root / "run"}


def copy_run(world: dict[str, Path], name: str) -> Path:
    """A private copy of the run, so tests that write eval/ or edit the manifest do not disturb each other."""
    target = world["root"] / name
    shutil.copytree(world["run"], target)
    return target


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["eval", *args], env=env)


# ---------------------------------------------------------------------------------------------- scorecard
def test_scorecard_matches_a_direct_computation(world):
    """Recompute every pi_k's log-probs with the plain full-logits path and the metrics with spoctl.losses."""
    from spoctl.data.store import load_prepared
    from spoctl.engine.batching import TokenPair, collate_pairs
    from spoctl.engine.chain import ModelChain
    from spoctl.engine.logprobs import reference_logps
    from spoctl.evaluate import evaluate

    run = copy_run(world, "run-scorecard")
    report = evaluate(EvalConfig(run=run, plot=False), Output(quiet=True))
    manifest = RunDir(run).read_manifest()
    chain = ModelChain(manifest["base_model"], RunDir(run), manifest)
    prepared = load_prepared(world["prepared"])
    pad = make_tokenizer().pad_token_id
    logps = {}
    for k in range(3):
        model = chain.load(k)
        for d in DIMS:
            ds = prepared.split(d, "eval")
            pairs = [TokenPair(p, c, r) for p, c, r in zip(ds["prompt_input_ids"], ds["chosen_input_ids"],
                                                       ds["rejected_input_ids"])]
            with torch.no_grad():
                logps[(k, d)] = reference_logps(model, collate_pairs(pairs, pad))
    betas = [0.5, 0.5]
    weights = [[], [0.5]]  # previous mode, alpha 0.5: lambda^(2) = [alpha]
    rows = {r["k"]: r for r in report["scorecard"]}
    for d in DIMS:
        rewards = losses.implicit_reward_margins(betas, weights, [logps[(k, d)][0] for k in range(3)],
                                                 [logps[(k, d)][1] for k in range(3)])
        for k in range(3):
            c, r = logps[(k, d)]
            cell = rows[k]["dims"][d]
            assert cell["pairs"] == 8
            assert cell["logp"]["margin"] == pytest.approx(float((c - r).mean()), abs=1e-4)
            if k == 0:
                assert "vs_base" not in cell
                continue
            base = losses.log_ratio_margin(c, r, *logps[(0, d)])
            assert cell["vs_base"]["accuracy"] == pytest.approx(float((base > 0).float().mean()))
            assert cell["vs_base"]["margin"] == pytest.approx(float(base.mean()), abs=1e-4)
            m = losses.reward_metrics(betas[k - 1], c, r, *logps[(k - 1, d)])
            assert cell["stage_reward"]["accuracy"] == pytest.approx(m["rewards/accuracies"])
            assert cell["stage_reward"]["margin"] == pytest.approx(m["rewards/margins"], abs=1e-4)
            assert cell["implicit_reward"]["accuracy"] == pytest.approx(float((rewards[k - 1] > 0).float().mean()))
            assert cell["implicit_reward"]["margin"] == pytest.approx(float(rewards[k - 1].mean()), abs=1e-4)
    # The engine's own end-of-stage metric agrees: the same log(pi_k / pi_0) accuracy.
    for st in manifest["stages"]:
        for d in DIMS:
            key = f"stage{st['index']}/{d}/eval_base_rewards/accuracies"
            assert rows[st["index"]]["dims"][d]["vs_base"]["accuracy"] == pytest.approx(st["metrics"][key])


def test_report_files_table_and_json(world):
    run = copy_run(world, "run-files")
    result = invoke(str(run))
    assert result.exit_code == 0, result.output
    assert "scorecard" in result.stdout and "1 helpful" in result.stdout and "2 harmless" in result.stdout
    rd = RunDir(run)
    report = json.loads(rd.eval_report_path.read_text())
    assert report["complete"] and report["dims"] == DIMS and [r["k"] for r in report["scorecard"]] == [0, 1, 2]
    assert rd.eval_markdown_path.read_text().startswith("# spoctl eval")
    assert rd.eval_plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["files"]["plot"] == str(rd.eval_plot_path)

    result = invoke(str(run), "--json", "--quiet")
    assert result.exit_code == 0
    printed = json.loads(result.stdout)
    assert printed["scorecard"] == report["scorecard"]


# ---------------------------------------------------------------------------------------------- gate
def test_gate_exit_codes(world, monkeypatch):
    run = copy_run(world, "run-gate")
    ok = invoke(str(run), "--quiet", "--no-plot", "--fail-under", "helpful=0", "--max-regression", "harmless=1")
    assert ok.exit_code == 0, ok.output
    report = json.loads(RunDir(run).eval_report_path.read_text())
    assert report["gate"]["passed"] is True and len(report["gate"]["checks"]) == 2

    # A bound above the last stage's real score fails (a dimension whose score is below 1 always exists here).
    last = {d: report["scorecard"][-1]["dims"][d]["vs_base"]["accuracy"] for d in DIMS}
    dim = min(last, key=last.get)
    assert last[dim] < 1.0
    broken = invoke(str(run), "--quiet", "--no-plot", "--fail-under", f"{dim}=1")
    assert broken.exit_code == 1
    lines = [l for l in broken.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: gate: {dim}: accuracy of log(pi_k/pi_0)")
    assert "below 1" in lines[0]
    report = json.loads(RunDir(run).eval_report_path.read_text())
    assert report["gate"]["passed"] is False and report["complete"] is True

    # Regression: the arithmetic is tested in test_eval_judges; here the wiring from scores to exit code 1.
    import spoctl.evaluate.runner as runner_mod

    monkeypatch.setattr(runner_mod, "gate_scores", lambda rows, d: [0.8, 0.6])
    res = invoke(str(run), "--quiet", "--no-plot", "--max-regression", "helpful=0.1")
    assert res.exit_code == 1 and "helpful: accuracy of log(pi_k/pi_0) fell 0.2000 below its best" in res.stderr
    assert invoke(str(run), "--quiet", "--no-plot", "--max-regression", "helpful=0.25").exit_code == 0

    assert invoke(str(run), "--fail-under", "nosuchdim=0.5").exit_code == 2
    assert invoke(str(run), "--fail-under", "helpful").exit_code == 2


@pytest.mark.parametrize("flag,value", [("--fail-under", "1.01"), ("--fail-under", "nan"), ("--fail-under", "-0.1"),
                                        ("--max-regression", "-0.01"), ("--max-regression", "inf")])
def test_gate_bounds_outside_0_1_are_refused_by_flag(world, flag, value):
    """A bound no score can break (or always breaks, or NaN, which compares false) is a mistake: exit 2 before
    any work, naming the flag."""
    run = copy_run(world, f"run-bounds{flag}{value}")
    res = invoke(str(run), "--no-plot", flag, f"helpful={value}")
    assert res.exit_code == 2
    assert res.stderr.startswith(f"error: {flag} helpful=") and "number from 0 to 1" in res.stderr
    assert not RunDir(run).eval_report_path.exists()


def test_gate_bounds_in_the_config_file_are_checked_too(world, tmp_path):
    cfg = tmp_path / "spoctl.yaml"
    cfg.write_text("eval:\n  gate:\n    fail_under: {helpful: .nan}\n")
    res = invoke(str(world["run"]), "--config", str(cfg), "--print-config")
    assert res.exit_code == 2 and "eval.gate.fail_under.helpful" in res.stderr and "number from 0 to 1" in res.stderr


def test_gate_on_an_unfinished_run_fails_unless_allowed(world):
    """Decision (issue 11.7): gating a run whose last stage did not finish fails (exit 1) and names the stage;
    --allow-incomplete gates the completed stages instead, and the report says so. Without a gate, an unfinished
    run is evaluated with a warning (exit 0)."""
    run = copy_run(world, "run-gate-unfinished")
    rd = RunDir(run)
    manifest = rd.read_manifest()
    manifest["stages"][1]["status"] = "failed"
    rd.write_manifest(manifest)
    res = invoke(str(run), "--no-plot", "--quiet", "--fail-under", "helpful=0")
    assert res.exit_code == 1
    assert "the run is not finished (stage 2 (harmless) is failed)" in res.stderr
    assert "--allow-incomplete" in res.stderr
    report = json.loads(rd.eval_report_path.read_text())
    assert report["gate"]["passed"] is False and report["gate"]["checks"][0]["missing_stage"] == 2
    assert [r["k"] for r in report["scorecard"]] == [0, 1]

    res = invoke(str(run), "--no-plot", "--fail-under", "helpful=0", "--allow-incomplete")
    assert res.exit_code == 0, res.output
    assert "completed stages of an unfinished run" in res.stdout
    report = json.loads(rd.eval_report_path.read_text())
    assert report["gate"]["passed"] is True and report["gate"]["incomplete_allowed"] is True
    assert "The run is not finished" in rd.eval_markdown_path.read_text()


def test_missing_or_unfinished_runs(world, tmp_path):
    res = invoke(str(tmp_path))
    assert res.exit_code == 2 and "no manifest.json" in res.stderr
    assert invoke(str(tmp_path / "nope")).exit_code == 2

    run = copy_run(world, "run-unfinished")
    rd = RunDir(run)
    manifest = rd.read_manifest()
    manifest["stages"][1]["status"] = "running"
    rd.write_manifest(manifest)
    res = invoke(str(run), "--no-plot")
    assert res.exit_code == 0, res.output
    assert "stage 2 (harmless) is running: not evaluated" in res.output
    report = json.loads(rd.eval_report_path.read_text())
    assert [r["k"] for r in report["scorecard"]] == [0, 1] and report["warnings"]

    manifest["stages"][0]["status"] = "failed"
    rd.write_manifest(manifest)
    res = invoke(str(run))
    assert res.exit_code == 2 and "no stage has completed" in res.stderr


def test_eval_from_another_working_directory(world, tmp_path, monkeypatch):
    """Runs record the prepared data as an absolute path; older ones as align was given it. A relative path is
    looked for beside the run directory, then in the current folder; failing both, the error says what to pass."""
    run = copy_run(world, "run-elsewhere")  # beside world["prepared"] and world["model"]
    rd = RunDir(run)
    manifest = rd.read_manifest()
    manifest["data"], manifest["base_model"] = "prepared", "./model"
    rd.write_manifest(manifest)
    monkeypatch.chdir(tmp_path)
    res = invoke(str(run), "--no-plot", "--quiet")
    assert res.exit_code == 0, res.output

    manifest["data"] = "gone/prepared"
    rd.write_manifest(manifest)
    res = invoke(str(run), "--no-plot")
    assert res.exit_code == 2
    assert str(rd.manifest_path) in res.stderr and "'gone/prepared'" in res.stderr and "--data" in res.stderr
    res = invoke(str(run), "--no-plot", "--quiet", "--data", str(world["prepared"]))
    assert res.exit_code == 0, res.output


def test_a_stage_model_changed_after_the_run_is_refused(world):
    """The scorecard of a model must not come from the cache of the model that was there before: a stage
    model whose weights changed after its run stops eval with exit 2, naming the file."""
    from safetensors.torch import load_file, save_file

    run = copy_run(world, "run-tampered")
    assert invoke(str(run), "--no-plot", "--quiet").exit_code == 0  # every log-prob is now cached
    weights = run / "stages" / "02-harmless" / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    evaluations = sorted((run / "eval").iterdir())
    res = invoke(str(run), "--no-plot")
    assert res.exit_code == 2
    assert "model.safetensors" in res.stderr and "02-harmless" in res.stderr
    assert sorted((run / "eval").iterdir()) == evaluations  # refused in the pre-flight: nothing written


# ---------------------------------------------------------------------------------------------- judged
def test_openai_judge_end_to_end_keeps_the_key_secret(world):
    run = copy_run(world, "run-openai")
    rd = RunDir(run)
    with FakeOpenAI(KEY, fail_first=(503,)) as server:
        args = [str(run), "--judge", "openai:tiny-judge", "--judge-url", server.url, "--judge-key-env",
                "SPOCTL_EVAL_TEST_KEY", "--num-prompts", "3", "--max-new-tokens", "6",
                "--set", "judge.backoff_s=0.01", "--set", "judge.calibration_pairs=2",
                "--no-plot", "--verbose"]
        res = invoke(*args, "--json", env={"SPOCTL_EVAL_TEST_KEY": KEY})
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        # 2 stages x 2 dims x 3 prompts, both orders (identical questions asked once), + 2 dims x 2 human pairs x 2;
        # one endpoint check first (which met the 503 and was retried).
        assert server.answered <= 2 * 2 * 3 * 2 + 2 * 2 * 2 and server.probes == 1
        assert server.calls == server.answered + 1 + 1
        calls, answered = server.calls, server.answered
        samples = rd.eval_samples_path.read_text()

        # A re-run with the same seed generates the same responses, so every judgment comes from the cache.
        again = invoke(*args, env={"SPOCTL_EVAL_TEST_KEY": KEY})
        assert again.exit_code == 0, again.output
        assert server.answered == answered and server.calls == calls + 1  # only the endpoint check
        assert rd.eval_samples_path.read_text() == samples

    wr = {r["k"]: r for r in report["win_rates"]}
    assert set(wr) == {1, 2}
    for r in wr.values():
        for d in DIMS:
            c = r["dims"][d]
            assert c["n"] == 3 and c["wins"] + c["ties"] + c["losses"] == 3
            assert c["ci_low"] <= c["win_rate"] <= c["ci_high"]
    assert report["judge"]["name"] == "openai" and report["judge"]["api_key_env"] == "SPOCTL_EVAL_TEST_KEY"
    assert set(report["judge"]["calibration"]) == set(DIMS)
    assert report["gate"]["score"] == "judged win rate"
    lines = [json.loads(l) for l in samples.splitlines()]
    assert len(lines) == 3 * 2 * 3 and {l["model"] for l in lines} == {"base", "stage1-helpful", "stage2-harmless"}
    alpaca = json.loads(rd.eval_alpaca_path.read_text())
    assert len(alpaca) == len(lines) and set(alpaca[0]) >= {"instruction", "output", "generator"}

    # The key is nowhere: not in the output, not in any file of the run.
    assert KEY not in res.output and KEY not in again.output
    for f in run.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_unreachable_judge_exits_2_before_generating(world):
    run = copy_run(world, "run-unreachable")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = invoke(str(run), "--judge", "openai:m", "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-key-env",
                 "SPOCTL_EVAL_TEST_KEY", "--num-prompts", "1", "--max-new-tokens", "2", "--set", "judge.max_retries=1",
                 "--set", "judge.backoff_s=0", "--no-plot", env={"SPOCTL_EVAL_TEST_KEY": KEY})
    assert res.exit_code == 2
    assert "cannot reach" in res.stderr
    # A failed pre-flight writes nothing: no evaluation folder, no pointer, no report.
    assert RunDir(run).latest_eval() is None and not (run / "eval").exists()


def test_judge_failing_half_way_keeps_the_scorecard_and_samples(world):
    run = copy_run(world, "run-half-way")
    with FakeOpenAI(KEY, bad_replies=1000) as server:  # the endpoint check passes; no verdict ever parses
        res = invoke(str(run), "--judge", "openai:m", "--judge-url", server.url, "--judge-key-env",
                     "SPOCTL_EVAL_TEST_KEY", "--num-prompts", "1", "--max-new-tokens", "2", "--set",
                     "judge.max_retries=0", "--no-plot", env={"SPOCTL_EVAL_TEST_KEY": KEY})
    assert res.exit_code == 2 and "unparsable answer" in res.stderr
    report = json.loads(RunDir(run).eval_report_path.read_text())
    assert report["complete"] is False and "unparsable answer" in report["error"]
    assert len(report["scorecard"]) == 3  # what was evaluated before the judge failed is kept
    assert RunDir(run).eval_samples_path.exists()


def test_credentials_in_the_judge_url_are_never_printed_or_saved(world):
    """user:password@ and ?api_key= in --judge-url work, and appear in no output and no file the run holds."""
    run = copy_run(world, "run-url-secrets")
    user_secret, query_secret = "hunter2-USERINFO-SECRET", "QUERY-SECRET-77"
    with FakeOpenAI(basic=("bob", user_secret), query_key=("api_key", query_secret)) as server:
        url = f"http://bob:{user_secret}@127.0.0.1:{server.port}/v1?api_key={query_secret}"
        args = [str(run), "--judge", "openai:tiny-judge", "--judge-url", url, "--judge-key-env",
                "SPOCTL_UNSET_KEY", "--num-prompts", "1", "--max-new-tokens", "3",
                "--set", "judge.calibration_pairs=1", "--no-plot", "--verbose"]
        outputs = [invoke(*args, env={"SPOCTL_UNSET_KEY": None}), invoke(*args, "--json", env={"SPOCTL_UNSET_KEY": None})]
        assert all(r.exit_code == 0 for r in outputs), outputs[0].output
        assert server.answered > 0
        outputs.append(invoke(*args, "--print-config"))
        outputs.append(invoke(*args, "--print-config", "--json"))
        # A failure names the endpoint (masked) in the message and in the partial report.
        bad = url.replace("/v1", "/wrong")
        failed = invoke(*[bad if a == url else a for a in args], env={"SPOCTL_UNSET_KEY": None})
        assert failed.exit_code == 2 and "HTTP 404" in failed.stderr
        assert f"http://***@127.0.0.1:{server.port}/wrong" in failed.stderr
        outputs.append(failed)
    assert "api_key=***" in outputs[2].stdout
    report = json.loads(outputs[1].stdout)
    assert report["judge"]["url"] == f"http://***@127.0.0.1:{server.port}/v1?api_key=***"
    files = [f for f in run.rglob("*") if f.is_file()]
    assert any("judge-cache" in str(f) for f in files)
    for secret in (user_secret, query_secret):
        for r in outputs:
            assert secret not in r.output and secret not in r.stdout
        for f in files:
            assert secret.encode() not in f.read_bytes(), f


def test_rules_judge_refuses_a_run_that_is_not_the_demo(world):
    run = copy_run(world, "run-rules")
    res = invoke(str(run), "--judge", "rules", "--no-plot")
    assert res.exit_code == 2
    assert "--judge rules scores the built-in demo task only" in res.stderr and "--judge embedding" in res.stderr
    assert not RunDir(run).eval_samples_path.exists()  # refused before any generation


def test_reward_model_judge_end_to_end(world):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_tokenizer()
    rm = world["root"] / "rm"
    if not rm.exists():
        torch.manual_seed(1)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
        LlamaForSequenceClassification(cfg).save_pretrained(rm, safe_serialization=True)
        tok.save_pretrained(rm)
    run = copy_run(world, "run-rm")
    res = invoke(str(run), "--judge", "reward-model", "--judge-model", f"helpful={rm}", "--judge-model",
                 f"harmless={rm}", "--num-prompts", "2", "--max-new-tokens", "4", "--no-plot", "--quiet",
                 "--fail-under", "helpful=0")
    assert res.exit_code == 0, res.output
    report = json.loads(RunDir(run).eval_report_path.read_text())
    assert report["judge"]["name"] == "reward-model"
    assert {d: report["win_rates"][0]["dims"][d]["n"] for d in DIMS} == {"helpful": 2, "harmless": 2}
    assert report["judge"]["calibration"]["helpful"]["pairs"] == 8
    # A missing per-dimension model is a usage error, before any generation.
    res = invoke(str(run), "--judge", "reward-model", "--judge-model", f"helpful={rm}", "--no-plot")
    assert res.exit_code == 2 and "--judge-model harmless=PATH" in res.stderr


# ---------------------------------------------------------------------------------------------- generation
def test_prompts_are_a_seeded_sample_of_distinct_prompts(world):
    from spoctl.evaluate.generate import prompt_rows
    from spoctl.evaluate.runinfo import open_run

    er = open_run(EvalConfig(run=world["run"]), Output(quiet=True))
    ds = er.prepared.split("helpful", "eval")
    rows = prompt_rows(er, "helpful", 5, seed=0)
    assert len(rows) == 5 and [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    for r in rows:  # each row is the eval split's row at `index`
        assert r["pair_id"] == ds[r["index"]]["pair_id"]
        assert r["prompt_input_ids"] == ds[r["index"]]["prompt_input_ids"]
    assert len({tuple(r["prompt_input_ids"]) for r in rows}) == 5
    assert [r["pair_id"] for r in prompt_rows(er, "helpful", 5, seed=0)] == [r["pair_id"] for r in rows]
    assert len(prompt_rows(er, "helpful", 100, seed=0)) == len(ds)


# ---------------------------------------------------------------------------------------------- eval history
def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_eval_keeps_its_folder_and_a_failed_preflight_writes_nothing(world, tmp_path):
    """Issue 18.4: a missing API key used to turn a complete report into {complete: false, scorecard: null}.
    Each evaluation now has its own folder; eval/latest.json names the latest (and the latest complete) one; a
    pre-flight failure leaves every file as it was; a half-way failure adds its own folder and moves `latest`,
    while `latest_complete` -- what export's model card reads -- stays on the last complete evaluation."""
    run = copy_run(world, "run-history")
    rd = RunDir(run)
    with FakeOpenAI(KEY) as server:
        judged = [str(run), "--judge", "openai:m", "--judge-url", server.url, "--judge-key-env", "SPOCTL_EVAL_TEST_KEY",
                  "--num-prompts", "2", "--max-new-tokens", "3", "--set", "judge.calibration_pairs=1", "--no-plot"]
        first = invoke(*judged, env={"SPOCTL_EVAL_TEST_KEY": KEY})
        assert first.exit_code == 0, first.output
        one = rd.latest_eval()
        assert one is not None and one.root.parent == run / "eval"
        assert json.loads(one.report_path.read_text())["eval_id"] == one.eval_id
        assert {p.name for p in one.root.iterdir()} >= {"report.json", "report.md", "samples.jsonl",
                                                         "samples.alpaca.json", "judge.json"}
        settings = json.loads(one.judge_settings_path.read_text())
        assert settings["judge"]["name"] == "openai" and settings["generation"]["temperature"] == 0.0
        assert KEY not in one.judge_settings_path.read_text()

        second = invoke(str(run), "--no-plot", "--quiet")  # scorecard only: a second folder, the first untouched
        assert second.exit_code == 0, second.output
        two = rd.latest_eval()
        assert two.eval_id != one.eval_id and one.report_path.is_file() and one.samples_path.is_file()
        assert rd.eval_pointer() == {"latest": two.eval_id, "latest_complete": two.eval_id}
        assert rd.eval_report_path == two.report_path and not two.samples_path.exists()

        before = _tree(run / "eval")
        missing_key = invoke(*judged, env={"SPOCTL_EVAL_TEST_KEY": None})
        assert missing_key.exit_code == 2 and "SPOCTL_EVAL_TEST_KEY" in missing_key.stderr
        assert _tree(run / "eval") == before

    with FakeOpenAI(KEY, bad_replies=1000) as server:  # passes the pre-flight, then no verdict parses
        judged[judged.index("--judge-url") + 1] = server.url
        half = invoke(*judged, "--set", "judge.max_retries=0", env={"SPOCTL_EVAL_TEST_KEY": KEY})
    assert half.exit_code == 2
    three = rd.latest_eval()
    assert three.eval_id not in (one.eval_id, two.eval_id)
    assert json.loads(three.report_path.read_text())["complete"] is False
    assert rd.latest_eval(complete=True).eval_id == two.eval_id
    assert _tree(two.root) == {k[len(two.eval_id) + 1:]: v for k, v in before.items() if k.startswith(two.eval_id + "/")}


def test_a_run_evaluated_before_eval_history_stays_readable(world):
    """Older runs have a bare eval/report.json: it is the latest evaluation until a new one is made, and a new
    evaluation leaves it where it is."""
    run = copy_run(world, "run-legacy")
    rd = RunDir(run)
    legacy = {"run_dir": str(run), "complete": True, "dims": DIMS, "scorecard": [], "note": "written by spoctl 0.x"}
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps(legacy))
    assert rd.eval_report_path == run / "eval" / "report.json"
    assert rd.latest_eval(complete=True).eval_id is None
    assert invoke(str(run), "--no-plot", "--quiet").exit_code == 0
    assert rd.latest_eval().eval_id is not None and rd.eval_report_path != run / "eval" / "report.json"
    assert json.loads((run / "eval" / "report.json").read_text()) == legacy


def test_a_forged_pointer_is_refused(world):
    run = copy_run(world, "run-forged")
    (run / "eval").mkdir()
    (run / "eval" / "latest.json").write_text(json.dumps({"latest": "../../etc", "latest_complete": None}))
    res = invoke(str(run), "--no-plot")  # the pointer is only read, never followed out of eval/
    assert res.exit_code == 0, res.output
    with pytest.raises(Exception, match="not an evaluation of this run"):
        RunDir(run / "nope").eval_files("../../etc")


def test_eval_and_align_end_with_the_next_command(world):
    run = copy_run(world, "run-next")
    res = invoke(str(run), "--no-plot")
    assert res.exit_code == 0, res.output
    assert f"spoctl compare {run} OTHER_RUN" in res.stdout and f"spoctl export --run {run}" in res.stdout


def test_generation_and_judging_show_progress_with_their_sizes(world):
    """Output captured as a non-terminal: plain progress lines, naming --num-prompts and --max-new-tokens."""
    run = copy_run(world, "run-progress")
    with FakeOpenAI(KEY) as server:
        res = invoke(str(run), "--judge", "openai:m", "--judge-url", server.url, "--judge-key-env",
                     "SPOCTL_EVAL_TEST_KEY", "--num-prompts", "3", "--max-new-tokens", "4", "--set",
                     "judge.calibration_pairs=2", "--no-plot", env={"SPOCTL_EVAL_TEST_KEY": KEY})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any(l.startswith("generation: 3 models x 6 prompts") and "--num-prompts 3" in l and
               "--max-new-tokens 4" in l and "greedy" in l for l in lines), res.stdout
    # What was really generated, per dimension; the win-rate table's headers say it again.
    assert "(helpful 3, harmless 3: each dimension's distinct eval prompts, at most --num-prompts 3)" in res.stdout
    header = next(l for l in lines if l.startswith("stage vs base"))
    assert [c.strip() for c in header.split("  ") if c.strip()][1:] == ["helpful (3 prompts)", "harmless (3 prompts)"]
    for k, label in enumerate(["base", "stage 1 helpful", "stage 2 harmless"]):
        done = [l for l in lines if l.startswith(f"generating: {label} (--num-prompts 3, --max-new-tokens 4): ")]
        assert done and done[-1].split(": ")[-1].startswith("6/6 prompts"), res.stdout
    judging = [l for l in lines if l.startswith("judging: ")]
    assert judging and "12/12 matchups" in judging[-1]
    assert any(l.startswith("judge calibration: helpful human pairs: 2/2") for l in lines)


def test_vllm_backend_is_refused_before_anything_is_written(world):
    run = copy_run(world, "run-vllm")
    res = invoke(str(run), "--judge", "openai:m", "--set", "generation.backend=vllm", "--no-plot")
    assert res.exit_code == 2
    assert "eval.generation.backend=vllm" in res.stderr and "generation.backend=transformers" in res.stderr
    assert not (run / "eval").exists()
