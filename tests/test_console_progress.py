"""`Output.progress`: plain periodic lines when not a terminal, nothing under --quiet or off the main process."""

from __future__ import annotations

import io

from spoctl.console import Output


def _plain_output(capsys_target: io.StringIO, **kw) -> Output:
    out = Output(**kw)
    out._console.file = capsys_target  # a non-terminal stream, as in a pipe or a CI log
    return out


def test_plain_lines_name_the_step_its_count_and_rate():
    buf = io.StringIO()
    out = _plain_output(buf)
    with out.progress("frozen pass pi_0", total=10, unit="pairs", plain_every_s=3600) as bar:
        for _ in range(5):
            bar.advance(2)
    lines = buf.getvalue().splitlines()
    # The first batch and the last one; nothing between within the (long) interval.
    assert len(lines) == 2, lines
    assert lines[0].startswith("frozen pass pi_0: 2/10 pairs (") and "eta" in lines[0]
    assert lines[1].startswith("frozen pass pi_0: 10/10 pairs (") and "eta" not in lines[1]
    assert bar.done == 10


def test_periodic_lines_and_an_unknown_total():
    buf = io.StringIO()
    out = _plain_output(buf)
    with out.progress("judging", total=None, unit="prompts", plain_every_s=0) as bar:
        for _ in range(3):
            bar.advance()
    with out.progress("judging", total=None, unit="prompts", plain_every_s=3600) as bar:
        for _ in range(3):
            bar.advance()  # the first count now, the last one when the step ends
    lines = buf.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["judging: 1 prompts", "judging: 2 prompts",
                                                       "judging: 3 prompts", "judging: 1 prompts",
                                                       "judging: 3 prompts"]


def test_quiet_and_other_processes_print_nothing_but_still_count():
    for kw in ({"quiet": True}, {"main_process": False}):
        buf = io.StringIO()
        out = _plain_output(buf, **kw)
        with out.progress("x", total=3) as bar:
            bar.advance(3)
        assert buf.getvalue() == "" and bar.done == 3
