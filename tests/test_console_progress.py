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


def test_a_write_says_its_size_first_and_its_time_after():
    buf = io.StringIO()
    out = _plain_output(buf)
    with out.writing("writing checkpoint step-000050", 1_520_400_000, "weights and optimizer state"):
        assert buf.getvalue() == "writing checkpoint step-000050: 1520 MB (weights and optimizer state)\n"
    end = buf.getvalue().splitlines()[1]
    assert end.startswith("writing checkpoint step-000050: 1520/1520 MB (") and "elapsed" in end
    buf = io.StringIO()
    with _plain_output(buf).writing("writing stage 1 model", 460_499):  # under a megabyte: kB, not "1 MB"
        pass
    assert buf.getvalue().splitlines()[0] == "writing stage 1 model: 460 kB"


def test_a_failed_write_prints_no_end_line():
    buf = io.StringIO()
    try:
        with _plain_output(buf).writing("writing stage 1 model", 2_000_000):
            raise OSError("disk full")
    except OSError:
        pass
    assert buf.getvalue() == "writing stage 1 model: 2 MB\n"  # no "2/2 MB": it did not finish


def test_on_a_terminal_a_write_draws_a_bar_inside_the_stage_bar():
    from rich.console import Console

    from spoctl.engine.progress import StageProgress

    out = Output()
    buf = io.StringIO()
    out._console = Console(file=buf, force_terminal=True, width=120, color_system=None)
    # A checkpoint is written while the stage's own bar is live: the two nest (one live display inside another).
    with StageProgress(out, "stage 1/2 helpful") as stage:
        stage.update(1, 2, {})
        with out.writing("writing checkpoint step-000001", 3_000_000):
            pass
        stage.update(2, 2, {})
    text = buf.getvalue()
    assert "writing checkpoint step-000001: 3 MB" in text and "3/3" in text and "stage 1/2 helpful" in text
