"""Every value a configuration accepts is one the run can use: finite numbers in ranges from their meaning, a config
file of bounded size with each key once, dimension names that stay apart as folders, errors blamed on where the
value came from."""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from spoctl.cli import app
from spoctl.config import (AlignConfig, EvalConfig, ExportConfig, PrepareConfig, ConfigError, bounds_of,
                           resolve_config, validate)

runner = CliRunner()
SECTIONS: dict[str, type[BaseModel]] = {"prepare": PrepareConfig, "align": AlignConfig, "eval": EvalConfig,
                                        "export": ExportConfig}
# Numbers whose range a validator of their own checks, with its own message (and therefore no Field bounds).
CHECKED_BY_VALIDATOR = {"align.keep.<K>", "align.stages.<K>.keep.<K>", "align.replay.<K>",
                        "align.stages.<K>.replay.<K>", "eval.gate.fail_under.<K>",
                        "eval.gate.max_regression.<K>"}


def _number_type(annotation: Any) -> type | None:
    """int or float when `annotation` holds a number (through Optional and Annotated), else None."""
    if annotation in (int, float):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _number_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        found = [t for t in map(_number_type, typing.get_args(annotation)) if t]
        return found[0] if found else None
    return None


def _model(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def numeric_fields(model: type[BaseModel], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any, list]]:
    """(path, annotation, metadata) of every number a model holds: its fields, its sections', the values of its
    mappings (a path part '<K>' stands for a mapping key)."""
    for name, field in model.model_fields.items():
        here = (*path, name)
        annotation = field.annotation
        if typing.get_origin(annotation) is dict or typing.get_origin(_strip_none(annotation)) is dict:
            value = typing.get_args(_strip_none(annotation))[1]
            inner = _model(value)
            if inner is not None:
                yield from numeric_fields(inner, (*here, "<K>"))
            elif _number_type(value):
                yield (*here, "<K>"), value, []
        elif _model(annotation) is not None:
            yield from numeric_fields(_model(annotation), here)
        elif _number_type(annotation):
            yield here, annotation, list(field.metadata)


def _strip_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


ALL_FIELDS = [(section, path, annotation, metadata) for section, model in SECTIONS.items()
              for path, annotation, metadata in numeric_fields(model)]


def _nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    keys = ["helpful" if p == "<K>" else p for p in path]
    tree: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        tree = {key: tree}
    return tree


def _read(cfg: BaseModel, path: tuple[str, ...]) -> Any:
    node: Any = cfg
    for p in path:
        p = "helpful" if p == "<K>" else p
        node = node[p] if isinstance(node, dict) else getattr(node, p)
    return node


def _within(value: float, bounds: list[tuple[str, Any]]) -> bool:
    ops = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b}
    return all(ops[sign](value, limit) for sign, limit in bounds)


def test_there_are_numbers_in_every_section():
    counts = {s: sum(1 for f in ALL_FIELDS if f[0] == s) for s in SECTIONS}
    assert all(counts.values()), counts
    assert len(ALL_FIELDS) > 50  # the walk reaches into sections and mappings (stages.<DIM>.beta, judge.*, ...)


@pytest.mark.parametrize("section,path,annotation,metadata", ALL_FIELDS,
                         ids=[".".join((f[0], *f[1])) for f in ALL_FIELDS])
def test_every_number_has_a_finite_range(section, path, annotation, metadata):
    key = ".".join((section, *path))
    if key in CHECKED_BY_VALIDATOR:
        return
    signs = {sign for sign, _ in bounds_of(annotation, metadata)}
    assert signs & {">", ">="} and signs & {"<", "<="}, f"{key}: needs a lower and an upper bound ({signs})"


NASTY = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e300, -1e300, 2**70, -1, 0, 1.2e29,
                     "inf", ".inf", "nan", "1e400", "-1e400", "2**70", "1.2e29", True]),
)


@pytest.mark.parametrize("section,path,annotation,metadata", ALL_FIELDS,
                         ids=[".".join((f[0], *f[1])) for f in ALL_FIELDS])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=NASTY)
def test_any_number_gives_a_clean_error_or_a_usable_value(section, path, annotation, metadata, value):
    """Non-finite, huge, negative: either a configuration error naming the key, or a config whose value is finite
    and within the declared range -- never another exception."""
    key = ".".join((section, *("helpful" if p == "<K>" else p for p in path)))
    try:
        cfg = validate(SECTIONS[section], _nested(path, value), section)
    except ConfigError as err:
        assert f"'{key}" in str(err) or f"'{section}'" in str(err) or "'" + key.rsplit(".", 1)[0] in str(err), err
        return
    got = _read(cfg, path)
    if got is None:
        return
    assert isinstance(got, (int, float)) and math.isfinite(got), (key, value, got)
    assert _within(got, bounds_of(annotation, metadata)), (key, value, got)


@pytest.mark.parametrize("command,setting,key,bound", [
    ("align", "seed=1180591620717411303424", "align.seed", "<= 4294967295"),
    ("align", "epochs=inf", "align.epochs", "<= 10000"),
    ("align", "adam_epsilon=inf", "align.adam_epsilon", "<= 1"),
    ("align", "learning_rate=1e400", "align.learning_rate", "<= 1"),
    ("align", "beta=.inf", "align.beta", "<= 1000"),
    ("align", "batch_size=120000000000000000000000000000", "align.batch_size", "<= 65536"),
    ("eval", "judge.timeout_s=inf", "eval.judge.timeout_s", "<= 3600"),
    ("eval", "judge.backoff_s=1e300", "eval.judge.backoff_s", "<= 60"),
])
def test_the_reported_values_are_refused_before_any_work(command, setting, key, bound):
    args = [command, "--set", setting, "--print-config"] + (["--data", "p"] if command == "align" else [])
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert f"'{key}'" in res.stderr and "accepted range: " in res.stderr and bound in res.stderr, res.stderr


def test_the_same_values_in_a_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("align:\n  learning_rate: 1e400\n  beta: .inf\n  batch_size: 1.2e+29\n")
    res = runner.invoke(app, ["align", "-c", str(cfg), "--data", "p", "--print-config"])
    assert res.exit_code == 2
    for key in ("learning_rate", "beta", "batch_size"):
        assert f"{cfg}: invalid value for 'align.{key}'" in res.stderr, res.stderr


# ------------------------------------------------------------------------------------------------ the config file
def test_a_config_file_is_read_up_to_a_cap():
    res = runner.invoke(app, ["align", "--config", "/dev/zero", "--print-config", "--json"])
    assert res.exit_code == 2 and "too large for a config file" in res.stderr
    assert json.loads(res.stdout)["exit_code"] == 2


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("align:\n  beta: 0.1\n  lora:\n    r: 4\n    r: 8\n  beta: 0.2\n")
    res = runner.invoke(app, ["align", "-c", str(cfg), "--data", "p", "--print-config"])
    assert res.exit_code == 2
    assert "key 'r' is given twice (lines 4 and 5)" in res.stderr or "key 'beta' is given twice (lines 2 and 6)" \
        in res.stderr, res.stderr
    cfg.write_text("align:\n  beta: 0.1\nalign:\n  beta: 0.2\n")
    res = runner.invoke(app, ["align", "-c", str(cfg), "--data", "p", "--print-config"])
    assert res.exit_code == 2 and "key 'align' is given twice (lines 1 and 3)" in res.stderr, res.stderr


def test_an_error_is_blamed_on_where_the_value_came_from(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("align:\n  beta: 0.2\n")
    res = runner.invoke(app, ["align", "-c", str(cfg), "--data", "p", "--set", "learning_rate=-1", "--print-config"])
    assert res.exit_code == 2 and str(cfg) not in res.stderr and "'align.learning_rate'" in res.stderr
    res = runner.invoke(app, ["align", "-c", str(cfg), "--data", "p", "--lr", "-1", "--print-config"])
    assert res.exit_code == 2 and str(cfg) not in res.stderr and "--lr -1.0:" in res.stderr
    cfg.write_text("align:\n  learning_rate: -1\n  beta: -1\n")
    res = runner.invoke(app, ["align", "-c", str(cfg), "--data", "p", "--set", "beta=-2", "--print-config"])
    lines = res.stderr.splitlines()
    assert any(ln.strip().startswith(f"{cfg}: invalid value for 'align.learning_rate'") for ln in lines), lines
    assert any(ln.strip().startswith("invalid value for 'align.beta'") for ln in lines), lines


# ------------------------------------------------------------------------------------------------ names and defaults
@pytest.mark.parametrize("args", [["align", "--dims", "helpful,Helpful", "--data", "p"],
                                  ["prepare", "--data", "helpful=a.jsonl", "--data", "HELPFUL=b.jsonl"]])
def test_dimensions_that_differ_only_by_case_are_refused(args):
    """Their folders (prepared/helpful, stages/01-helpful) would be one on macOS and Windows."""
    res = runner.invoke(app, [*args, "--print-config"])
    assert res.exit_code == 2 and "differ only by case" in res.stderr, res.output


def test_lora_has_its_own_default_learning_rate():
    from spoctl.config import FULL_LEARNING_RATE, LORA_LEARNING_RATE

    def lr(*args: str) -> float:
        res = runner.invoke(app, ["align", "--data", "p", *args, "--print-config", "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["align"]["learning_rate"]

    assert lr() == FULL_LEARNING_RATE and lr("--lora") == LORA_LEARNING_RATE == 2e-4
    assert lr("--lora", "--lr", "5e-4") == 5e-4 and lr("--set", "lora.enabled=true") == LORA_LEARNING_RATE
    # a default, not a setting of the user's: the demo's own rate still applies under `align` without data
    res = runner.invoke(app, ["align", "--print-config", "--json"])
    assert json.loads(res.stdout)["align"]["learning_rate"] == 1e-4


def test_eval_help_shows_what_judge_takes():
    text = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    assert "--judge NAME[:ARG]" in text and "--judge DIM=PATH" not in text


def test_loss_type_and_smoothing_are_checked_by_the_configuration():
    with pytest.raises(ConfigError, match="unknown loss type 'robust'"):
        resolve_config(AlignConfig, "align", set_items=["loss.type=robust"])
    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid loss only"):
        resolve_config(AlignConfig, "align", set_items=["loss.type=hinge", "loss.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="'align.loss.label_smoothing'"):
        resolve_config(AlignConfig, "align", set_items=["loss.label_smoothing=0.6"])


def test_no_color_means_no_escape_sequences(monkeypatch):
    """NO_COLOR (no-color.org) asks for no colour; spoctl writes no bold or italic either on a terminal."""
    import io

    from spoctl.console import Output

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich treats the stream as a terminal
    for no_color, escapes in (("1", False), ("", True)):
        monkeypatch.setenv("NO_COLOR", no_color)
        monkeypatch.setenv("FORCE_COLOR", "1")
        out = Output()
        assert out.is_terminal
        buf = io.StringIO()
        out.console.file = buf
        out.warn("careful")
        out.table("T", ["a"], [[1]])
        out.console.print("[bold]b[/bold] [italic]i[/italic]")
        assert ("\x1b[" in buf.getvalue()) is escapes, repr(buf.getvalue())
