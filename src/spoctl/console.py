"""How commands talk to people and to scripts.

- `--json`: exactly one JSON document on stdout (the command's result); human messages go to stderr.
- A terminal gets rich output (colours, tables, progress bars); a pipe or file gets plain lines.
- `--quiet` keeps only warnings and errors; `--verbose` adds detail lines.
- Several processes (torchrun, accelerate launch): only the global main process prints human output and the
  result; errors are printed by the CLI's error handler on every process that has one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.table import Table


def is_main_process(env: dict[str, str] | None = None) -> bool:
    """Whether this process should talk to people: the global main process of a distributed launch (RANK 0; without
    RANK, LOCAL_RANK 0), or a plain single process. Read from the launcher's environment variables, which exist
    before any accelerate/torch.distributed setup, so the first lines are already printed once."""
    env = os.environ if env is None else env
    for name in ("RANK", "LOCAL_RANK"):
        value = env.get(name, "").strip()
        if value:
            return value == "0"
    return True


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
        self._console = Console(file=stream, highlight=False, soft_wrap=True)
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
            sys.stdout.write(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
            sys.stdout.flush()

    def document(self, text: str) -> None:
        """A document the user asked for on stdout (`--print-config`), printed by the main process only."""
        if self.main_process:
            sys.stdout.write(text)
            sys.stdout.flush()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
