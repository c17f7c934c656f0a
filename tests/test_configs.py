"""Configuration documented from the models (issue 12.7): the example files in configs/ resolve through the real
configuration code, the option tables in docs/*.md are what `spoctl.docgen` makes from the pydantic models, and
every setting has a description."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from spoctl import docgen
from spoctl.config import SECTIONS, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_example_configs_are_there():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "hh-rlhf-lora", "pku-saferlhf", "helpsteer", "all-mode-three-dims"} <= names, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_resolves_for_every_section_it_has(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the files' paths are relative to the repository root, where their commands run
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw and set(raw) <= set(SECTIONS), f"{path.name}: sections {sorted(raw)}"
    for section in raw:
        model, _ = docgen.SECTIONS[section]
        cfg = resolve_config(model, section, path)
        # every key written in the file made it into the resolved configuration
        assert _subset(raw[section], cfg.model_dump(mode="json")), (path.name, section)


def _subset(given, resolved) -> bool:
    if isinstance(given, dict):
        return isinstance(resolved, dict) and all(k in resolved and _subset(v, resolved[k]) for k, v in given.items())
    if isinstance(given, float) or isinstance(resolved, float):
        return float(given) == float(resolved)
    return given == resolved or str(given) == str(resolved)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_header_gives_the_command_that_runs_it(path):
    header = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.startswith("#")]
    commands = [ln[4:] for ln in header if ln.startswith("#   ")]
    assert any(re.search(rf"spoctl \w+ .*--config configs/{re.escape(path.name)}\b", c) for c in commands), header
    assert "Run from the repository root" in " ".join(ln.lstrip("# ") for ln in header)


def test_demo_config_is_the_demo_settings():
    from spoctl.demo.run import DEMO_ALIGN

    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["align"]
    assert _subset(DEMO_ALIGN, raw) and _subset(raw, DEMO_ALIGN), (raw, DEMO_ALIGN)


def test_readme_links_the_configs_folder():
    assert "](configs" in (ROOT / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ generated tables
def test_docs_tables_match_the_models():
    files = docgen.doc_files(ROOT)
    sections = {m.group("section") for f in files for m in docgen.BLOCK.finditer(f.read_text(encoding="utf-8"))}
    assert sections == set(SECTIONS), sections
    tables: dict[str, str] = {}
    stale = [f.name for f in files if docgen.render(f.read_text(encoding="utf-8"), tables) != f.read_text(encoding="utf-8")]
    assert not stale, f"configuration tables out of date in {stale}: run `make docs-config`"


def test_a_stale_table_is_found_and_rewritten(tmp_path):
    (tmp_path / "docs").mkdir()
    text = (ROOT / "docs" / "align.md").read_text(encoding="utf-8")
    edited = text.replace("| `beta` | `--beta` | float (> 0, <= 1000.0) | `0.1` |", "| `beta` | `--beta` | float (> 0, <= 1000.0) | `0.2` |")
    assert edited != text
    (tmp_path / "docs" / "align.md").write_text(edited, encoding="utf-8")
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "docs" / "align.md").read_text(encoding="utf-8") == text
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0


def test_table_rows_follow_the_models():
    rows = {key: (kind, default) for key, kind, default, _ in docgen.rows(docgen.SECTIONS["prepare"][0])}
    assert rows["length.max_length"] == ("int (> 1, <= 1048576)", "`1024`")
    assert rows["length.overflow"][0] == "truncate \\| drop"
    align = {key: kind for key, kind, _, _ in docgen.rows(docgen.SECTIONS["align"][0])}
    assert "stages.<DIM>.beta" in align and align["stages.<DIM>.loss"].startswith("section (")
    assert "lora.r" in align and "loss.sft_weight" in align


def test_makefile_regenerates_the_tables():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^docs-config:.*\n\t.*-m spoctl\.docgen", makefile, re.M)


def test_every_setting_has_a_description():
    missing = docgen.missing_descriptions()
    assert not missing, f"settings without description=: {missing}"
