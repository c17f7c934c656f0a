"""Fuzzing `spoctl prepare` with generated malformed records (hypothesis): whatever the input, the command ends with
exit 0 and a complete prepared folder, or exit 2 with one `error: ...` line and no folder at all. Never exit 1,
never a traceback, never a partial output.

The default run is short (80 examples). A longer run uses the same test with more examples:

    SPOCTL_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/test_prepare_fuzz.py

(the `prepare-fuzz` settings profile reads that variable; a `make fuzz` target would run exactly this).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from prepare_helpers import run_prepare, siblings
from spoctl.data.formats import FORMAT_NAMES
from spoctl.data.store import load_prepared

settings.register_profile(
    "prepare-fuzz",
    max_examples=int(os.environ.get("SPOCTL_FUZZ_EXAMPLES", "80")),
    deadline=None,  # one example runs a whole prepare: its time varies with the machine, not with correctness
    database=None,  # no .hypothesis folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KEYS = ["prompt", "chosen", "rejected", "response", "response_0", "response_1", "better_response_id",
        "safer_response_id", "instruction", "input", "history", "conversations", "system", "messages", "helpfulness",
        "role", "content", "from", "value"]
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=24), st.sampled_from(ROLES), st.just("\n\nHuman: hi\n\nAssistant: there"))
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(ROLES) | scalars, "content": st.text(max_size=30) | scalars,
                                              "from": st.sampled_from(ROLES), "value": st.text(max_size=30)})
values = st.recursive(scalars | message, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4), max_leaves=10)
records = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), values, max_size=7)
near_valid = st.fixed_dictionaries({"prompt": st.text(max_size=40) | values, "chosen": st.text(max_size=40) | values,
                                    "rejected": st.text(max_size=40) | values})
raw_lines = st.one_of(st.binary(max_size=40), st.just(b'{"prompt": "q", "chosen": "a \\ud800", "rejected": "b"}'),
                      st.just(b"[" * 5000), st.just(b"{}"), st.just(b""))
malformed = st.lists(st.one_of(records.map(lambda r: json.dumps(r).encode()), near_valid.map(lambda r: json.dumps(r).encode()),
                               raw_lines), min_size=1, max_size=8)
# Valid pairs of arbitrary text (any Unicode, long words, odd whitespace), so that success paths are fuzzed too.
valid = st.lists(st.fixed_dictionaries({k: st.text(min_size=1, max_size=60) for k in ("prompt", "chosen", "rejected")})
                 .map(lambda r: json.dumps(r).encode()), min_size=1, max_size=8)
lines = st.one_of(malformed, valid)
options = st.fixed_dictionaries({
    "format": st.sampled_from([None, *FORMAT_NAMES]),
    "max_length": st.sampled_from([None, "8", "24", "64"]),
    "overflow": st.sampled_from([None, "drop"]),
    "truncation": st.sampled_from([None, "keep-end"]),
})


@pytest.fixture(scope="module")
def fast_tokenizer(tiny_tokenizer_dir):
    """Load the tokenizer once for all examples (the load is not what is being fuzzed)."""
    import spoctl.models
    from spoctl.models import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spoctl.models, "load_tokenizer", lambda *a, **k: tok)
        yield tiny_tokenizer_dir


@settings(settings.get_profile("prepare-fuzz"))
@given(body=lines, opts=options)
def test_prepare_never_fails_badly(fast_tokenizer, body, opts):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "d.jsonl"
        src.write_bytes(b"\n".join(body) + b"\n")
        out = Path(tmp) / "out"
        args = ["--data", f"d={src}"]
        for flag, key in (("--format", "format"), ("--max-length", "max_length"), ("--overflow", "overflow"),
                          ("--prompt-truncation", "truncation")):
            if opts[key]:
                args += [flag, opts[key]]
        res = run_prepare(fast_tokenizer, out, *args)
        assert res.exit_code in (0, 2), f"exit {res.exit_code}: {res.exception!r}\n{res.output}"
        assert "Traceback" not in res.output
        event(f"exit {res.exit_code}")  # --hypothesis-show-statistics shows how often each outcome was reached
        if res.exit_code == 2:
            assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
            assert siblings(out) == []
        else:
            assert siblings(out) == ["out"]
            with load_prepared(out) as data:  # complete and verified
                for dim in data.dims:
                    assert len(data.split(dim, "train")) + len(data.split(dim, "eval")) == data.dim_info(dim)["counts"]["kept"]
