"""How commands talk to people and to scripts.

- `--json`: exactly one JSON document on stdout (the command's result); human messages go to stderr.
- A terminal gets rich output (colours, tables, progress bars); a pipe or file gets plain lines.
- `--quiet` keeps only warnings and errors; `--verbose` adds detail lines.
- Several processes (torchrun, accelerate launch): only the global main process prints human output and the
  result; errors are printed by the CLI's error handler on every process that has one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from rich.console import Console
from rich.table import Table

from .launcher import is_main_process


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    verbose: bool = False
    main_process: bool = field(default_factory=is_main_process)
    # Human text goes to stderr in JSON mode so stdout stays machine-readable.
    _console: Console = field(init=False, repr=False)
    result_printed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        stream = sys.stderr if self.json_mode else sys.stdout
        # NO_COLOR (no-color.org): rich would drop colours but keep bold, italic and the like; a user who sets it
        # wants text without escape sequences, so none are written at all (tables and bars stay, in plain text).
        plain = os.environ.get("NO_COLOR", "") != ""
        self._console = Console(file=stream, highlight=False, soft_wrap=True,
                                **({"color_system": None} if plain else {}))
        if not self.main_process:
            self.quiet, self.verbose = True, False

    @property
    def is_terminal(self) -> bool:
        return self._console.is_terminal

    @property
    def console(self) -> Console:
        return self._console

    def info(self, message: str) -> None:
        if not self.quiet:
            self._print(message)

    def detail(self, message: str) -> None:
        if self.verbose and not self.quiet:
            self._print(message)

    def warn(self, message: str) -> None:
        if self.main_process:  # every process would repeat the same warning
            self._print(f"warning: {message}", style="yellow")

    def _print(self, message: str, style: str | None = None) -> None:
        if self.is_terminal:
            self._console.print(message, style=style)
        else:
            # Plain lines: no markup interpretation, no wrapping, one line per message.
            print(message, file=self._console.file, flush=True)

    @contextlib.contextmanager
    def progress(self, label: str, total: int | None, unit: str = "items", *,
                 plain_every_s: float = 10.0) -> Iterator["Progress"]:
        """Progress of one long step (a frozen pass, tokenizing, generation, judging, a checkpoint write):
        `with out.progress("frozen pass pi_0", total=320, unit="pairs") as bar: ... bar.advance(8)`.

        A rich bar (items, rate, ETA) on a terminal; plain lines otherwise -- the first item, then at most one
        line every `plain_every_s` seconds, and the last -- so a log shows that the step is alive and how far it
        got. Nothing under --quiet or on processes other than the main one (the handle still counts)."""
        bar = Progress(self, label, total, unit, plain_every_s=plain_every_s)
        with bar:
            yield bar

    @contextlib.contextmanager
    def writing(self, label: str, nbytes: int, what: str = "") -> Iterator["Progress"]:
        """A write done by one library call (`save_pretrained`, a torch.distributed.checkpoint save) that can take
        seconds: nothing can be counted while it runs, so it is an `Output.progress` in megabytes (kB below one)
        that completes when the body does. First a line saying what is written and how big; then on a terminal a
        bar whose elapsed time runs, otherwise one plain line at the end with the time and the rate."""
        unit, scale = ("MB", 1e6) if nbytes >= 1e6 else ("kB", 1e3)
        total = max(1, round(nbytes / scale))
        self.info(f"{label}: {total} {unit}" + (f" ({what})" if what else ""))
        with self.progress(label, total=total, unit=unit) as bar:
            yield bar
            bar.advance(total - bar.done)

    def table(self, title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        if self.quiet:
            return
        rows = [[_fmt(v) for v in row] for row in rows]
        if self.is_terminal:
            t = Table(title=title)
            for c in columns:
                t.add_column(c)
            for row in rows:
                t.add_row(*row)
            self._console.print(t)
        else:
            out = self._console.file
            print(title, file=out)
            widths = [max(len(str(c)), *(len(r[i]) for r in rows)) if rows else len(str(c)) for i, c in enumerate(columns)]
            print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)), file=out)
            for row in rows:
                print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=out)
            out.flush()

    def result(self, payload: dict[str, Any]) -> None:
        """The command's machine-readable result: printed only in --json mode, by the main process."""
        if self.json_mode and self.main_process:
            self.result_printed = True
            stream = document_stream()
            stream.write(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
            stream.flush()

    def document(self, text: str) -> None:
        """A document the user asked for on stdout (`--print-config`), printed by the main process only."""
        if self.main_process:
            stream = document_stream()
            stream.write(text)
            stream.flush()


# Where the one JSON document goes while `stdout_reserved` holds stdout; None: stdout itself.
_document: Any = None


def document_stream() -> Any:
    return _document if _document is not None else sys.stdout


@contextlib.contextmanager
def stdout_reserved(enabled: bool = True) -> Iterator[None]:
    """Under --json, stdout belongs to the one JSON document: while the command runs, everything else written to
    it -- spoctl's own prints, a library's (accelerate's `print`, a tracker's banner), C code's, a child process's --
    goes to stderr, and `document_stream()` is the real stdout. The file descriptor is redirected where there is one
    (a real process), else only `sys.stdout` (an in-process test runner)."""
    global _document
    if not enabled or _document is not None:
        yield
        return
    original = sys.stdout
    try:
        original.flush()
        fd, err_fd = original.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        fd = err_fd = None
    saved = None
    if fd is not None and err_fd is not None:
        saved = os.dup(fd)
        os.dup2(err_fd, fd)
        _document = open(saved, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - closed below
    else:
        _document = original
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = original
        document, _document = _document, None
        with contextlib.suppress(OSError, ValueError):
            document.flush()
        if saved is not None:
            with contextlib.suppress(OSError, ValueError):  # a reader that left (`| head`) is the caller's to report
                document.close()  # its descriptor is `saved` (closefd=False): closed below, after fd 1 has it back
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
                original.flush()
            os.dup2(saved, fd)
            os.close(saved)


def percent(share: float | None) -> str:
    """A share, an accuracy or a win rate in every table spoctl prints: one format, "77.5%" ("-": none)."""
    return "-" if share is None else f"{100 * share:.1f}%"


def points(change: float) -> str:
    """A change of a share, in percentage points: "+12.5 pts"."""
    return f"{100 * change:+.1f} pts"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """The handle `Output.progress` yields; see there. `advance(n)` after each batch, `done` items so far."""

    def __init__(self, out: Output, label: str, total: int | None, unit: str, *, plain_every_s: float):
        self.out, self.label, self.total, self.unit = out, label, total, unit
        self.plain_every_s, self.done, self._printed = plain_every_s, 0, 0
        self.enabled = not out.quiet and out.main_process
        self._bar: Any = None
        self._task: Any = None
        self._t0 = self._last_plain = time.perf_counter()

    def __enter__(self) -> "Progress":
        self._t0 = self._last_plain = time.perf_counter()
        if self.enabled and self.out.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TaskProgressColumn,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn(f"{{task.fields[rate]}} {self.unit}/s"), TaskProgressColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.out.console,
                                     transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, rate="-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None and self.done != self._printed:
            self._plain()  # the last count, if advance() did not already print it

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.rate:.3g}")
            return
        now = time.perf_counter()
        first, last = self.done == n, self.total is not None and self.done >= self.total
        if first or last or now - self._last_plain >= self.plain_every_s:
            self._plain()

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self._t0, 1e-9)

    def _plain(self) -> None:
        self._last_plain = now = time.perf_counter()
        self._printed = self.done
        elapsed = now - self._t0
        of = f"/{self.total}" if self.total is not None else ""
        eta = (f" eta {(self.total - self.done) / max(self.rate, 1e-9):.0f}s"
               if self.total is not None and self.done < self.total else "")
        self.out.info(f"{self.label}: {self.done}{of} {self.unit} ({self.rate:.3g} {self.unit}/s) "
                      f"elapsed {elapsed:.0f}s{eta}")
