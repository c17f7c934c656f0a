"""Shared pieces of the `spoctl` command line: the Typer app, the options every subcommand has, error handling.

Every subcommand is declared with `@command(...)`, which gives it the same conventions:

- the shared options, declared once here: `--config FILE` (YAML, one section per subcommand), `--set KEY=VALUE`
  overrides, `--print-config`, `--json` (one JSON document on stdout), `--quiet`, `--verbose`; the command
  receives them as one `CommonOptions` parameter named `opts`;
- readable metavars (`DIM=SOURCE`, `KEY=VALUE`, `PATH`, `INT`) and help examples printed verbatim;
- one error handler (`SpoctlGroup`, via `spoctl.errors.describe_error`): `error: ...` on stderr and, with
  `--json`, one error object on stdout; exit codes 0 success, 1 a check failed, 2 usage/input/file-system error,
  70 a bug (with the traceback), 130 interrupted (Ctrl-C), 143 / 129 stopped by SIGTERM / SIGHUP (spoctl.signals).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, get_args, get_origin, get_type_hints

import typer
from typer.core import TyperGroup
from typer.models import ArgumentInfo, OptionInfo, ParameterInfo

try:  # recent Typer vendors Click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException

from .. import __version__
from .flags import COMMAND_FLAGS, Flag, flag_for
from ..config import ConfigError, StrictModel, dump_config, resolve_config
from ..console import Output, stdout_reserved
from ..errors import EXIT_INTERNAL, CheckFailed, ErrorInfo, Stopped, UsageError, describe_error
from ..launcher import is_main_process
from ..signals import checks_done, stop_signals

ISSUES = "the spoctl issue tracker"
M = TypeVar("M", bound=StrictModel)
_ARGV, _OPTS = "spoctl.argv", "spoctl.opts"


# ------------------------------------------------------------------------------------------------ errors
def _json_in(argv: Sequence[str]) -> bool:
    argv = list(argv)
    return "--json" in (argv[: argv.index("--")] if "--" in argv else argv)


def _print_json_error(info: ErrorInfo) -> None:
    try:
        sys.stdout.write(json.dumps(info.as_json()) + "\n")
        sys.stdout.flush()
    except OSError:  # stdout itself is what failed (a full disk, a closed pipe): stderr already has the message
        _silence_stdout()


def _silence_stdout() -> None:
    """Point a stdout that cannot be written at /dev/null, so the interpreter's exit does not fail on what is
    still buffered ('Exception ignored ...', exit 120)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def handle_exception(err: BaseException, *, json_mode: bool, result_printed: bool = False) -> int:
    """Report an exception a command raised and return the exit code: `error: ...` on stderr (every process
    that has the error); with --json also the error as one JSON object on stdout (main process only), unless the
    command already printed its result document there. An unexpected exception keeps its traceback."""
    info = describe_error(err)
    if info is None:  # a bug: show the traceback, and say where to report it
        traceback.print_exception(type(err), err, err.__traceback__)
        info = ErrorInfo(f"internal error ({type(err).__name__}: {err}). This is a bug in spoctl {__version__}:"
                         f" please report it at {ISSUES}, with the command and the traceback above.",
                         "internal", EXIT_INTERNAL)
    print(f"error: {info.message}", file=sys.stderr, flush=True)
    if json_mode and not result_printed and is_main_process():
        _print_json_error(info)
    return info.exit_code


class SpoctlGroup(TyperGroup):
    """The `spoctl` group: the one place where exceptions become messages and exit codes, for `spoctl ...`,
    `python -m spoctl ...` and `CliRunner().invoke(app, ...)` alike. `invoke` (which runs every subcommand, and
    parses its options) knows the command's options; `main` catches what escapes before that."""

    def main(self, args: Sequence[str] | None = None, *posargs: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            return super().main(argv, *posargs, **kwargs)
        except BrokenPipeError:
            _silence_stdout()  # `spoctl ... | head`: the reader left; nothing to report
            sys.exit(1)
        except (Exception, Stopped) as err:  # noqa: BLE001 - the top-level handler
            sys.exit(handle_exception(err, json_mode=_json_in(argv)))

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)  # to honour --json for errors found before a command runs
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            quiet_library_output()
            with stop_signals():  # SIGTERM / SIGHUP end the command as an error (align: after a checkpoint)
                return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except ClickException as err:  # bad flags: Typer prints usage and the message itself, exit 2
            if _json_in(ctx.meta.get(_ARGV, [])) and is_main_process():
                _print_json_error(ErrorInfo(err.format_message(), "usage", err.exit_code))
            raise
        except BrokenPipeError:
            raise
        except (Exception, KeyboardInterrupt, Stopped) as err:  # noqa: BLE001 - the top-level handler
            opts = ctx.meta.get(_OPTS)
            json_mode = opts.json if opts is not None else _json_in(ctx.meta.get(_ARGV, []))
            printed = opts is not None and opts.output.result_printed
            raise typer.Exit(handle_exception(err, json_mode=json_mode, result_printed=printed)) from None


app = typer.Typer(
    name="spoctl",
    cls=SpoctlGroup,
    help="Align a causal LM to several preference dimensions in sequence with Sequential Preference Optimization.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        print(f"spoctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version."),
) -> None:
    pass


# ------------------------------------------------------------------------------------------------ shared options
@dataclass
class CommonOptions:
    """The options every subcommand has, declared once (`SHARED_OPTIONS`) and handed to the command as `opts`."""

    config: Optional[Path] = None
    set: Optional[list[str]] = None
    print_config: bool = False
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    # The command's flag table (cli/flags.py) and what its flags set: config key -> value, None where not given.
    flag_table: list[Flag] = field(default_factory=list, repr=False)
    flags: dict[str, Any] = field(default_factory=dict, repr=False)
    # The command line as given after `spoctl` (subcommand first), for messages that say what to run next.
    argv: list[str] = field(default_factory=list, repr=False)
    _output: Output | None = field(default=None, repr=False)

    @property
    def output(self) -> Output:
        if self._output is None:
            self._output = Output(json_mode=self.json, quiet=self.quiet, verbose=self.verbose)
        return self._output

    def resolve(self, model_cls: type[M], section: str, extra: dict[str, Any] | None = None) -> M:
        """The validated configuration: defaults < --config < --set < the command's flags (`self.flags`, then
        `extra`: config key -> value from the command's own parameters, None where not given). An invalid value a
        flag set is reported with that flag."""
        flags = {**self.flags, **{k: v for k, v in (extra or {}).items() if v is not None or k not in self.flags}}
        try:
            return resolve_config(model_cls, section, self.config, self.set, flags)
        except ConfigError as err:
            raise UsageError(name_flags_in(err, flags, self.flag_table)) from None


# name in CommonOptions -> (annotation, the Typer option). Every subcommand lists them after its own options.
SHARED_OPTIONS: dict[str, tuple[Any, OptionInfo]] = {
    "config": (Optional[Path], typer.Option(None, "--config", "-c", metavar="PATH",
                                            help="YAML config file (sections: prepare, align, eval, compare, export).")),
    "set": (Optional[list[str]], typer.Option(None, "--set", help="Override any config key: --set KEY=VALUE"
                                                                  " (repeatable).")),
    "print_config": (bool, typer.Option(False, "--print-config", help="Print the resolved configuration and exit.")),
    "json": (bool, typer.Option(False, "--json", help="Print one machine-readable JSON document on stdout (the"
                                                      " result, or the error).")),
    "quiet": (bool, typer.Option(False, "--quiet", "-q", help="Only warnings and errors.")),
    "verbose": (bool, typer.Option(False, "--verbose", "-v", help="More detail.")),
}
_CTX_PARAM = "_spoctl_ctx"
_PAIR_METAVAR = re.compile(r"\b([A-Z][A-Z_]*=[A-Z][A-Z_]*)\b")  # DIM=SOURCE, KEY=VALUE, DIM=W in a help text


def _non_empty_path(value: str) -> Path:
    if not value.strip():
        raise typer.BadParameter("empty path; give a file or folder name")
    return Path(value)


def _base_type(annotation: Any) -> Any:
    """Optional[list[Path]] -> Path: the type of one value."""
    while get_origin(annotation) is not None:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if not args:
            break
        annotation = args[0]
    return annotation


def _metavar(annotation: Any, info: ParameterInfo, name: str) -> str | None:
    """A readable metavar: a KEY=VALUE pattern named in the help (DIM=SOURCE), else PATH, INT, FLOAT or TEXT; an
    argument's is its name (RUN_DIR)."""
    base = _base_type(annotation)
    if base is bool:
        return None
    if isinstance(info, ArgumentInfo):
        return name.upper()
    pattern = _PAIR_METAVAR.search(info.help or "")
    if pattern:
        return pattern.group(1)
    return {Path: "PATH", int: "INT", float: "FLOAT"}.get(base, "TEXT")


def _polished(annotation: Any, info: ParameterInfo, name: str) -> ParameterInfo:
    """A copy of a parameter's Typer declaration with a readable metavar and, for a path, a parser that refuses an
    empty string (Path("") would silently mean the current folder)."""
    info = copy.copy(info)
    if info.metavar is None:
        info.metavar = _metavar(annotation, info, name)
    if (_base_type(annotation) is Path and isinstance(info, OptionInfo) and info.parser is None
            and get_origin(annotation) is not list):
        info.parser = _non_empty_path
    return info


def with_common_options(fn: Callable[..., Any], config: type[StrictModel] | None = None,
                        flags: Sequence[Flag] = ()) -> Callable[..., Any]:
    """Give `fn(..., opts: CommonOptions)` its own parameters, then the options of its flag table (`flags`, whose
    help and types come from the `config` model), then the shared options, and call it with the shared options
    and what the table's flags set gathered in `opts`."""
    hints = get_type_hints(fn)
    own = [p for p in inspect.signature(fn).parameters.values() if p.name != "opts"]
    params = []
    kw = inspect.Parameter.KEYWORD_ONLY
    for p in own:
        annotation = hints.get(p.name, p.annotation)
        default = _polished(annotation, p.default, p.name) if isinstance(p.default, ParameterInfo) else p.default
        params.append(p.replace(annotation=annotation, default=default, kind=kw))
    for f in flags:
        annotation = f.annotation(config)
        params.append(inspect.Parameter(f.param, kw, default=_polished(annotation, f.option(config), f.param),
                                        annotation=annotation))
    # In --help: the command's arguments, its table's flags, then its other options (--debug, --no-plot).
    params.sort(key=lambda p: 0 if isinstance(p.default, ArgumentInfo) else 1 if p.name.startswith("flag_") else 2)
    for name, (annotation, info) in SHARED_OPTIONS.items():
        params.append(inspect.Parameter(name, kw, default=_polished(annotation, info, name), annotation=annotation))
    params.append(inspect.Parameter(_CTX_PARAM, kw, annotation=typer.Context))

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        ctx: typer.Context = kwargs.pop(_CTX_PARAM)
        opts = CommonOptions(**{name: kwargs.pop(name) for name in SHARED_OPTIONS}, flag_table=list(flags))
        opts.argv = list(ctx.meta.get(_ARGV, []))
        ctx.meta[_OPTS] = opts
        raw = {f.param: kwargs.pop(f.param) for f in flags}
        with stdout_reserved(opts.json):  # stdout holds the one JSON document and nothing else
            for f in flags:  # after ctx.meta has opts: a bad DIM=VALUE is then reported under --json too
                opts.flags.update(f.to_config(raw[f.param]))
            return fn(**kwargs, opts=opts)

    wrapper.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def examples_epilog(examples: Sequence[str], title: str = "Examples") -> str | None:
    """Help examples printed exactly as written: each line in a `\\b` paragraph, which Click does not re-wrap, so a
    long command stays one line that can be copied."""
    if not examples:
        return None
    lines = "\n".join(f"  {line}" for line in examples)
    return f"{title}:\n\n\b\n{lines}"


def command(name: str | None = None, *, config: type[StrictModel] | None = None, flags: Sequence[Flag] = (),
            examples: Sequence[str] = (), **kwargs: Any) -> Callable[..., Any]:
    """Register a subcommand on `app` with its flag table (options derived from the `config` model, see
    cli/flags.py), the shared options, readable metavars and verbatim examples."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        COMMAND_FLAGS[name or fn.__name__.strip("_")] = list(flags)
        return app.command(name, epilog=examples_epilog(examples), **kwargs)(with_common_options(fn, config, flags))

    return register


# ------------------------------------------------------------------------------------------------ running a command
def execute(opts: CommonOptions, build: Callable[[], StrictModel], section: str,
            action: Callable[[Any], dict[str, Any]], *,
            header: Callable[[Any], str | None] | None = None,
            action_checks_more: bool = False) -> dict[str, Any] | None:
    """The shape of every subcommand: build the configuration (`opts.resolve`), then print it (--print-config,
    after the comment `header(cfg)` if any) or act on it and print the result. Returns the result (None after
    --print-config). Under a launcher a SIGTERM or SIGHUP waits for the input checks (signals.exit_before_start
    says why): the configuration's, and `action`'s own first when `action_checks_more` (it then calls
    `signals.checks_done()` itself, as align does after checking its data and model)."""
    cfg = build()
    if opts.print_config or not action_checks_more:
        checks_done()
    out = opts.output
    if opts.print_config:
        if out.json_mode:
            out.result({section: cfg.model_dump(mode="json")})
        else:
            note = header(cfg) if header is not None else None
            comment = "".join(f"# {line}\n" for line in note.splitlines()) if note else ""
            out.document(comment + dump_config(cfg, section))
        return None
    result = action(cfg)
    out.result(result)
    return result


def fail_check(reason: str) -> None:
    """Exit 1 with a one-line reason: a check the user asked for (the eval gate) did not pass."""
    raise CheckFailed(reason)


# ------------------------------------------------------------------------------------------------ flags in errors
def name_flags_in(err: ConfigError, flags: dict[str, Any], table: Sequence[Flag]) -> str:
    """The validation message with, on each line whose key a flag set, the flag as the user typed it; for an error
    on a whole section (a rule between its keys), the flags of the other keys in it, so the message says what
    to pass."""
    given = {k: v for k, v in flags.items() if v is not None}
    text = str(err)
    head, _, rest = text.partition(":")
    lines = [ln.strip() for ln in rest.split("\n") if ln.strip()]
    keys = err.keys()
    if len(lines) != len(keys):  # not the shape format_validation_error writes: leave it as it is
        return text
    out = []
    for line, key in zip(lines, keys):
        set_by = [k for k in given if k == key or k.startswith(f"{key}.") or key.startswith(f"{k}.") or not key]
        named = [(k, flag_for(table, k)) for k in set_by]
        typed = [f"{f} {_shown(given[k])}".rstrip() for k, f in named if f]
        if typed:
            line = f"{', '.join(typed)}: {_say_flags(line, named)}"
            related = sorted({f for k in flags if k.startswith(f"{key}.") and k not in set_by
                              for f in [flag_for(table, k)] if f})
            if related:
                line += f" (related: {', '.join(related)})"
        out.append(line)
    return f"{head}: {out[0]}" if len(out) == 1 else f"{head}:\n  " + "\n  ".join(out)


def _say_flags(line: str, named: list[tuple[str, str | None]]) -> str:
    """In the sentence of a rule between keys ('max_prompt_tokens (300) must be smaller than max_length'), the
    flag in place of each bare key name the user set with it; quoted keys ('prepare.length') and plain words
    ('out') stay as they are."""
    head, sep, sentence = line.partition("': ")
    if not sep:
        head, sentence = "", line
    for key, flag in named:
        leaf = key.rsplit(".", 1)[-1]
        if flag and "_" in leaf:
            sentence = re.sub(rf"(?<![\w.'-]){re.escape(leaf)}(?![\w'])", flag.split("/")[0], sentence)
    return f"{head}{sep}{sentence}"


def _shown(value: Any) -> str:
    return "" if isinstance(value, bool) or not isinstance(value, (int, float, str)) else str(value)


# ------------------------------------------------------------------------------------------------ library noise
def quiet_library_output() -> None:
    """Library progress bars (weight loading, dataset saving) would drown spoctl's own output, and warnings about
    one library's use of another are not the user's to act on."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF de-quantization bar
    # peft's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecates in favour
    # of `is_activation_checkpointing`: every `--lora` run and LoRA export printed this FutureWarning. Only this
    # message is silenced; other warnings still show.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # peft, saving adapters of a base model that has no config.json next to it (a .gguf file), cannot check whether
    # the vocabulary was resized; spoctl's adapters never touch the embeddings, so its assumption holds.
    warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the vocabulary"
                                              r" was not modified", category=UserWarning)
    # bitsandbytes, imported by transformers or peft whenever it is installed, logs on CPUs with AVX512-BF16 that
    # an optional `kernels` package is missing -- on every run, QLoRA or not. Its errors still show.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # The libraries read these when first imported: set here, `spoctl --help` and usage errors need not import
    # datasets and transformers (seconds) just to quiet them. A library imported already (a Python caller, a test)
    # is told directly.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
