"""Public preference data sets in their published shapes (tests/fixtures/data): Nectar's ranked answers,
UltraFeedback's per-aspect ratings, SHP's labels (polarity checked on pairs whose preference is known), a
`save_to_disk` Dataset, orca_dpo_pairs' system column, HelpSteer2's lower-is-better verbosity, several sources
mixed into one dimension; and each shape prepared and trained for one step on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.data.formats import adapt
from spoctl.data.sources import Where
from spoctl.data.store import load_prepared
from spoctl.errors import InputError

from tinyworld import make_model_dir

FIXTURES = Path(__file__).parent / "fixtures" / "data"
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prepare(tmp_path: Path, tok: Path, *args: str, out: str = "out"):
    return runner.invoke(app, ["prepare", "--model", str(tok), "--out", str(tmp_path / out), *args])


def rows(out: Path, dim: str) -> list[dict]:
    with load_prepared(out) as data:
        return list(data.split(dim, "train")) + list(data.split(dim, "eval"))


def info(out: Path, dim: str) -> dict:
    with load_prepared(out) as data:
        return data.dim_info(dim)


def fixture_records(name: str) -> list:
    lines = (FIXTURES / name).read_text(encoding="utf-8").splitlines()
    return [(Where(name, "line", i), json.loads(line)) for i, line in enumerate(lines, start=1)]


# ------------------------------------------------------------------------------------------- Nectar: ranked answers
def test_nectar_best_against_each_worse_answer(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'nectar.jsonl'}")
    assert res.exit_code == 0, res.output
    assert "detected ranked (ranked answers)" in res.stdout
    got = rows(tmp_path / "out", "d")
    # 5 + 4 + 4 + 3 answers: 4 + 3 + 3 + 2 pairs, one a duplicate (rank 3 and 4 are the same text "15.")
    c = info(tmp_path / "out", "d")["counts"]
    assert (c["read"], c["candidates"], c["kept"], c["dropped"]) == (4, 12, 11, {"duplicate": 1})
    best = {"100 °C (212 °F) at standard atmospheric pressure.": 4, "13 is a prime number between 10 and 20.": 2,
            "Merci.": 2}
    for text, n in best.items():
        assert [r["chosen"] for r in got].count(text) == n
    running = [r for r in got if r["chosen"].startswith("Start with 20 minutes")]
    assert {r["rejected"] for r in running} == {"Try a couch-to-5k plan and buy comfortable shoes.",
                                                "Just run as far as you can every day.", "Running is a sport."}
    # The transcript prompt becomes chat turns, without Nectar's trailing empty "Assistant:" turn.
    assert json.loads(running[0]["prompt_messages"]) == [
        {"role": "user", "content": "I want to start running."},
        {"role": "assistant", "content": "Great idea! How often can you train?"},
        {"role": "user", "content": "Three times a week. Where do I start?"}]


def test_ranked_sampled_pairing_and_min_gap():
    recs = fixture_records("nectar.jsonl")
    sampled = adapt("ranked", recs, "d", SimpleNamespace(pairing="sampled", seed=0, min_score_gap=1.0))["d"]
    assert len(sampled.pairs) == 4 and sampled.dropped == {"not_sampled": 8}
    assert adapt("ranked", recs, "d", SimpleNamespace(pairing="sampled", seed=0))["d"].pairs == sampled.pairs  # seeded
    gap2 = adapt("ranked", recs, "d", SimpleNamespace(min_score_gap=2.0))["d"]
    # rank differences of at least 2 from the best: 3 + 2 + 2 + 1 pairs; the rank-2 answers are below the gap
    assert len(gap2.pairs) == 8 and gap2.dropped == {"below_min_gap": 4}
    assert all(p.chosen != "11." for p in gap2.pairs)


@pytest.mark.parametrize("answers, expected", [
    ("nope", "field 'answers': expected a list of ranked answers, got a string"),
    ([{"answer": "a"}], "field 'answers[0].rank': missing field in a ranked answer"),
    ([{"answer": "a", "rank": "first"}], "field 'answers[0].rank': expected a numeric rank, got a string"),
    ([{"answer": " ", "rank": 1}], "field 'answers[0].answer': empty (whitespace-only) response"),
])
def test_ranked_errors_name_the_field(answers, expected):
    with pytest.raises(InputError, match="f.jsonl: line 1: ") as exc:
        adapt("ranked", [(Where("f.jsonl", "line", 1), {"prompt": "q", "answers": answers})], "d")
    assert expected in str(exc.value)


def test_ranked_plain_list_is_best_first_and_ties_are_counted():
    out = adapt("ranked", [(Where("f", "line", 1), {"prompt": "q", "answers": ["best", "mid", "worst"]}),
                           (Where("f", "line", 2), {"prompt": "r", "answers": [{"answer": "a", "rank": 1},
                                                                                 {"answer": "b", "rank": 1}]}),
                           (Where("f", "line", 3), {"prompt": "s", "answers": ["only"]})], "d")["d"]
    assert [(p.chosen, p.rejected) for p in out.pairs] == [("best", "mid"), ("best", "worst")]
    assert out.dropped == {"score_tie": 1, "too_few_answers": 1}


# ------------------------------------------------------------------------------------------- UltraFeedback raw
def test_ultrafeedback_one_source_four_dimensions(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"uf={FIXTURES / 'ultrafeedback.jsonl'}")
    assert res.exit_code == 0, res.output
    with load_prepared(tmp_path / "out") as data:
        assert data.dims == ["instruction_following", "honesty", "truthfulness", "helpfulness"]
    counts = {d: info(tmp_path / "out", d)["counts"] for d in ("helpfulness", "honesty")}
    assert counts["helpfulness"]["kept"] == 6 and counts["helpfulness"]["dropped"] == {}
    # honesty: 5,5,2,N/A | 5,2,4 | 5,5 -> 1 + 2 + 0 pairs; two ties with the best, one unrated answer
    assert counts["honesty"]["kept"] == 3 and counts["honesty"]["dropped"] == {"score_tie": 2, "unrated": 1}
    honest = rows(tmp_path / "out", "honesty")
    assert {(r["chosen"][:20], r["rejected"][:20]) for r in honest} == {
        ("Sunlight is scattere", "The sky reflects the"), ("No. 91 = 7 × 13, so ", "Yes, 91 is prime bec"),
        ("No. 91 = 7 × 13, so ", "I think 91 might not")}


def test_ultrafeedback_one_aspect_by_dim(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"truthful={FIXTURES / 'ultrafeedback.jsonl'}?dim=truthfulness")
    assert res.exit_code == 0, res.output
    with load_prepared(tmp_path / "out") as data:
        assert data.dims == ["truthful"]
    assert info(tmp_path / "out", "truthful")["counts"]["kept"] == 4


def test_ultrafeedback_bad_rating_names_the_field():
    rec = json.loads((FIXTURES / "ultrafeedback.jsonl").read_text().splitlines()[0])
    rec["completions"][1]["annotations"]["honesty"]["Rating"] = "five"
    with pytest.raises(InputError) as exc:
        adapt("ultrafeedback", [(Where("uf.jsonl", "line", 3), rec)], "uf")
    assert "uf.jsonl: line 3: field 'completions[1].annotations.honesty': expected a numeric rating or N/A, got 'five'" \
        in str(exc.value)


# ------------------------------------------------------------------------------------------- SHP: label polarity
# In the fixture the preferred comment is the helpful one (its score is higher, labels follows the scores).
HELPFUL_SHP = {"Use plenty of boiling, salted water and stir in the first two minutes.",
               "Probably under-proofed: let the dough rise until it has doubled, and check that your yeast is fresh.",
               "Trim the stems and keep them in a glass of water in the fridge, loosely covered.",
               "Yes, with an acid: about 1/4 teaspoon of soda plus 1/2 teaspoon of cream of tartar per teaspoon of powder."}


def test_shp_labels_one_means_a_is_preferred(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={FIXTURES / 'shp.jsonl'}")
    assert res.exit_code == 0, res.output
    assert "detected shp (Stanford SHP)" in res.stdout
    got = rows(tmp_path / "out", "helpful")
    assert {r["chosen"] for r in got} == HELPFUL_SHP and not {r["rejected"] for r in got} & HELPFUL_SHP


def test_shp_mapped_onto_pku_needs_the_polarity_stated(tmp_path, tiny_tokenizer_dir):
    """PKU's better_response_id is the index of the better response; SHP's labels=1 means the first: mapping one
    onto the other inverts every pair unless `:reverse` says so."""
    cols = "prompt=history,response_0=human_ref_A,response_1=human_ref_B,better_response_id=labels"
    src = f"helpful={FIXTURES / 'shp.jsonl'}"
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", src, "--columns", cols + ":reverse")
    assert res.exit_code == 0, res.output
    assert "detected pku-saferlhf" in res.stdout  # one label column: only the helpful dimension, no safer_response_id
    assert {r["chosen"] for r in rows(tmp_path / "out", "helpful")} == HELPFUL_SHP
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", src, "--columns", cols, out="inverted")
    assert res.exit_code == 0, res.output
    assert not {r["chosen"] for r in rows(tmp_path / "inverted", "helpful")} & HELPFUL_SHP


def test_pku_label_missing_after_the_first_record_is_an_error():
    first = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0, "safer_response_id": 1}
    second = {k: v for k, v in first.items() if k != "safer_response_id"}
    with pytest.raises(InputError, match="line 2: field 'safer_response_id': missing field"):
        adapt("pku-saferlhf", [(Where("f", "line", 1), first), (Where("f", "line", 2), second)], "d")


# ------------------------------------------------------------------------------------------- system column, datasets
def test_orca_system_column_is_kept(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'orca_dpo_pairs.jsonl'}",
                  "--columns", "prompt=question,system=system")
    assert res.exit_code == 0, res.output
    got = {r["chosen"]: json.loads(r["prompt_messages"]) for r in rows(tmp_path / "out", "d")}
    assert got["Modern."] == [{"role": "system", "content": "You are an AI assistant that follows instruction extremely well."},
                              {"role": "user", "content": "Give the opposite of 'ancient'."}]
    assert got["Guten Morgen."] == [{"role": "user", "content": "Translate to German: Good morning."}]  # empty system


@pytest.mark.parametrize("fmt, rec", [
    ("pku-saferlhf", {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 0}),
    ("helpsteer", {"prompt": "p", "response": "a", "helpfulness": 3}),
    ("ranked", {"prompt": "p", "answers": ["a", "b"]}),
    ("shp", {"history": "p", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}),
    ("hh-rlhf", {"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"}),
    ("pairwise", {"prompt": "p", "chosen": "a", "rejected": "b"}),
])
def test_system_maps_everywhere_a_prompt_does(fmt, rec):
    recs = [(Where("f", "line", 1), rec | {"system": "Be brief."})]
    if fmt == "helpsteer":
        recs.append((Where("f", "line", 2), {"prompt": "p", "response": "b", "helpfulness": 1, "system": "Be brief."}))
    for dim_pairs in adapt(fmt, recs, "d").values():
        assert dim_pairs.pairs and dim_pairs.pairs[0].prompt[0] == {"role": "system", "content": "Be brief."}


def test_a_saved_dataset_loads_like_a_saved_datasetdict(tmp_path, tiny_tokenizer_dir):
    import datasets

    recs = [json.loads(line) for line in (FIXTURES / "trl_standard_explicit.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(recs)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("saved", "saved_dict"):
        res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={tmp_path / name}", out=f"out_{name}")
        assert res.exit_code == 0, res.output
        assert info(tmp_path / f"out_{name}", "d")["counts"]["kept"] == len(recs)
    assert rows(tmp_path / "out_saved", "d") == rows(tmp_path / "out_saved_dict", "d")
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={tmp_path / 'saved'}?data_dir=x", out="bad")
    assert res.exit_code == 2 and "saved with save_to_disk holds one split and no subsets; data_dir" in res.stderr


# ------------------------------------------------------------------------------------------- lower is better
def test_helpsteer_verbosity_lower_is_better(tmp_path, tiny_tokenizer_dir):
    src = f"hs={FIXTURES / 'helpsteer2.jsonl'}"
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", src, "--set", "attributes=[verbosity]",
                  "--columns", "verbosity=verbosity:reverse")
    assert res.exit_code == 0, res.output
    concise = rows(tmp_path / "out", "verbosity")
    assert len(concise) == 4 and all(len(r["chosen"]) < len(r["rejected"]) for r in concise)
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", src, "--set", "attributes=[verbosity]", out="plain")
    assert res.exit_code == 0, res.output
    assert all(len(r["chosen"]) > len(r["rejected"]) for r in rows(tmp_path / "plain", "verbosity"))


def test_reverse_on_an_unknown_field_is_still_refused(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'helpsteer2.jsonl'}", "--columns", "promt=question")
    assert res.exit_code == 2 and "did you mean 'prompt'" in res.stderr


# ------------------------------------------------------------------------------------------- mixing sources
def test_several_sources_mix_into_one_dimension(tmp_path, tiny_tokenizer_dir):
    a, b = FIXTURES / "trl_standard_explicit.jsonl", FIXTURES / "ultrafeedback_binarized.jsonl"
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={a}", "--data", f"helpful={b}?weight=0.5")
    assert res.exit_code == 0, res.output
    assert f"helpful: mixing 4 of 4 pairs from {a}, 2 of 3 pairs from {b}?weight=0.5" in res.stdout
    entry = info(tmp_path / "out", "helpful")
    assert entry["counts"]["kept"] == 6 and entry["counts"]["dropped"] == {"mix_weight": 1}
    assert [(s["source"], s["weight"], s["candidates"], s["sampled"], s["kept"]) for s in entry["sources"]] == [
        (str(a), 1.0, 4, 4, 4), (f"{b}?weight=0.5", 0.5, 3, 2, 2)]
    again = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={a}", "--data", f"helpful={b}?weight=0.5",
                    out="again")
    assert again.exit_code == 0
    assert info(tmp_path / "again", "helpful")["hashes"] == entry["hashes"]  # seeded: the same sample
    other = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"helpful={a}", "--data", f"helpful={b}?weight=0.5",
                    "--seed", "3", out="other")
    assert other.exit_code == 0 and info(tmp_path / "other", "helpful")["counts"]["kept"] == 6


def test_mixing_in_a_config_file(tmp_path, tiny_tokenizer_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prepare:\n  data:\n    helpful:\n"
                   f"      - {FIXTURES / 'trl_standard_explicit.jsonl'}\n"
                   f"      - {{source: {FIXTURES / 'orca_dpo_pairs.jsonl'}, columns: {{prompt: question, system: system}},"
                   " weight: 0.5}\n")
    res = prepare(tmp_path, tiny_tokenizer_dir, "--config", str(cfg))
    assert res.exit_code == 0, res.output
    assert [s["sampled"] for s in info(tmp_path / "out", "helpful")["sources"]] == [4, 2]


def test_the_same_source_twice_is_refused(tmp_path, tiny_tokenizer_dir):
    a = FIXTURES / "trl_standard_explicit.jsonl"
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={a}", "--data", f"d={a}")
    assert res.exit_code == 2 and "dimension 'd' is given twice with the same source" in res.stderr
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={a}", "--data", f"d={a}?weight=1.5")
    assert res.exit_code == 2 and "weight" in res.stderr


# ------------------------------------------------------------------------------------------- every shape trains
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model") / "m")


@pytest.mark.parametrize("args, dim", [
    (["--data", f"d={FIXTURES / 'nectar.jsonl'}"], "d"),
    (["--data", f"uf={FIXTURES / 'ultrafeedback.jsonl'}"], "honesty"),
    (["--data", f"d={FIXTURES / 'shp.jsonl'}"], "d"),
    (["--data", f"d={FIXTURES / 'orca_dpo_pairs.jsonl'}", "--columns", "prompt=question,system=system"], "d"),
    (["--data", f"hs={FIXTURES / 'helpsteer2.jsonl'}", "--columns", "verbosity=verbosity:reverse"], "verbosity"),
    (["--data", f"d={FIXTURES / 'trl_standard_explicit.jsonl'}", "--data", f"d={FIXTURES / 'nectar.jsonl'}?weight=0.5"], "d"),
])
def test_every_shape_prepares_and_trains_one_step(tmp_path, tiny_model, args, dim):
    res = prepare(tmp_path, tiny_model, *args, "--max-length", "256")
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["align", "--dims", dim, "--data", str(tmp_path / "out"), "--out", str(tmp_path / "run"),
                              "--max-steps", "1", "--batch-size", "1", "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert json.dumps(manifest).count('"completed"') >= 1


# ------------------------------------------------------------------------------------------- what prepare says
def test_prepare_says_what_it_will_do_shows_progress_and_splits_the_dropped_column(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'nectar.jsonl'}")  # captured: not a terminal
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("preparing 1 --data entry from 1 source, 0.0 MiB of files: read and convert to pairs")
    assert "tokenizing 12 pairs in 1 dimension (d 12), max_length 1024" in lines
    assert "d: tokenizing: 11/11 pairs" in res.stdout  # the progress line (plain, as in a log)
    header = next(line for line in lines if line.startswith("dimension"))
    assert header.split() == ["dimension", "format", "kept", "train", "eval", "dropped", "tokens", "median/p95/max",
                              "truncated"]
    row = next(line for line in lines if line.startswith("d "))
    t = info(tmp_path / "out", "d")["tokens"]["total"]
    assert "1: 1 duplicate" in row and f"{t['median']:.0f} / {t['p95']:.0f} / {t['max']:.0f}" in row


def test_progress_and_messages_go_to_stderr_under_json(tmp_path, tiny_tokenizer_dir):
    res = prepare(tmp_path, tiny_tokenizer_dir, "--data", f"d={FIXTURES / 'nectar.jsonl'}", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["dims"] == ["d"] and "d: tokenizing: 11/11 pairs" in res.stderr
