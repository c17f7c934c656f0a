"""Every link in the user docs resolves inside the repository, and docs/method.md names real functions.

Checked: README.md, docs/*.md and benchmarks/README.md, parsed as CommonMark (+ tables) with markdown-it-py, so
links inside code spans and code blocks are not links (as on GitHub). A relative link must name a file or folder
inside this repository (nothing under ../shared or elsewhere outside it: a clone or a wheel does not have it); a
`#fragment` must be a heading of the target Markdown file, slugged as GitHub does, or an `#L<line>` of another
file. External links, bare URLs included (GitHub turns them into links), must be on EXTERNAL_ALLOWED.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt

from spoctl import losses

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

# External pages a doc may link to, each with the reason. Documentation of other projects is named in words
# instead (it moves, and a link checker would need the network); the paper is a fixed, citable record.
EXTERNAL_ALLOWED = {
    "https://arxiv.org/abs/2405.12739": "the SPO paper the method comes from (docs/method.md cites it)",
}

_MD = MarkdownIt("commonmark").enable("table")
_BARE_URL = re.compile(r"(?:https?|ftp)://[^\s<>()\[\]`]+|www\.[^\s<>()\[\]`]+")
_HTML_URL = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)
_HTML_ANCHOR = re.compile(r"""<a\s[^>]*\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
_LINE_ANCHOR = re.compile(r"L(\d+)(?:-L(\d+))?")


def github_slug(text: str) -> str:
    """A heading's anchor as GitHub makes it (github-slugger): lower case, drop everything but letters, digits,
    '_', '-' and spaces, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _plain(inline) -> str:
    """The text a heading renders to: code spans keep their content, markup goes."""
    return "".join(t.content for t in inline.children or [] if t.type in ("text", "code_inline"))


def anchors(path: Path) -> set[str]:
    """The #fragments a Markdown file defines: heading slugs (repeats get -1, -2, ... as on GitHub) and HTML ids."""
    tokens = _MD.parse(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found: set[str] = set()
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            slug = github_slug(_plain(tokens[i + 1]))
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
        elif tok.type in ("html_block", "inline"):
            html = tok.content if tok.type == "html_block" else "".join(
                c.content for c in tok.children or [] if c.type == "html_inline")
            found.update(_HTML_ANCHOR.findall(html))
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link, image, HTML href/src and bare URL outside code, in file order."""
    out: list[tuple[int, str]] = []
    for tok in _MD.parse(path.read_text(encoding="utf-8")):
        line = tok.map[0] + 1 if tok.map else 0
        if tok.type == "html_block":
            out += [(line, u) for u in _HTML_URL.findall(tok.content)]
        if tok.type != "inline":
            continue
        in_link = 0
        for child in tok.children or []:
            if child.type == "link_open":
                in_link += 1
                out.append((line, str(child.attrGet("href"))))
            elif child.type == "link_close":
                in_link -= 1
            elif child.type == "image":
                out.append((line, str(child.attrGet("src"))))
            elif child.type == "html_inline":
                out += [(line, u) for u in _HTML_URL.findall(child.content)]
            elif child.type == "text" and not in_link:
                out += [(line, u.rstrip(".,;:!?'\"")) for u in _BARE_URL.findall(child.content)]
            # a softbreak moves to the next source line; children carry no line numbers of their own
            if child.type in ("softbreak", "hardbreak"):
                line += 1
    return out


def check_link(source: Path, target: str, root: Path = ROOT) -> str | None:
    """Why `target`, linked from `source`, does not resolve inside `root`; None when it does."""
    parts = urlsplit(target)
    if parts.scheme or target.startswith(("//", "www.")):
        if target in EXTERNAL_ALLOWED:
            return None
        return "external link not on the allow-list (EXTERNAL_ALLOWED in tests/test_docs_links.py)"
    if parts.path.startswith("/"):
        return "absolute path: link relative to this file instead"
    dest = (source.parent / unquote(parts.path)).resolve() if parts.path else source.resolve()
    if not dest.is_relative_to(root.resolve()):
        return f"points outside the repository ({dest})"
    if not dest.exists():
        return f"no such file or folder: {dest.relative_to(root.resolve())}"
    fragment = unquote(parts.fragment)
    if not fragment:
        return None
    if dest.is_file() and dest.suffix == ".md":
        if fragment not in anchors(dest):
            return f"no heading #{fragment} in {dest.relative_to(root.resolve())}"
        return None
    m = _LINE_ANCHOR.fullmatch(fragment)
    if dest.is_file() and m:
        n_lines = len(dest.read_text(encoding="utf-8").splitlines())
        if max(int(m.group(1)), int(m.group(2) or 0)) > n_lines:
            return f"#{fragment} is past the last line ({n_lines})"
        return None
    return f"#{fragment}: only Markdown headings and #L<line> of a file can be linked"


def problems(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root)
    return [f"{rel}:{line}: ({target}) {why}" for line, target in links(path)
            if (why := check_link(path, target, root))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(doc):
    bad = problems(doc)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_checker_catches_what_it_should(tmp_path):
    """The checker fails each kind of bad link and passes each kind of good one (so the test above can fail)."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (tmp_path / "shared.md").write_text("# Outside\n")
    (repo / "code.py").write_text("a = 1\nb = 2\n")
    (repo / "docs" / "other.md").write_text("# Other page\n\n## `spoctl align` — staged, SPO\n\n## Repeat\n\n"
                                            "## Repeat\n\n<a id=\"custom\"></a>\n")
    page = repo / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok](other.md#other-page) [ok](other.md#spoctl-align--staged-spo) [ok](other.md#repeat-1)\n"
        "[ok](other.md#custom) [ok](#page) [ok](../code.py#L2) [ok](../docs/) [ok](https://arxiv.org/abs/2405.12739)\n"
        "![ok](other.md) `[code](missing.md)` and https://arxiv.org/abs/2405.12739.\n\n"
        "```\n[in a fence](missing.md) https://example.com\n```\n\n"
        "    [indented code](missing.md)\n\n"
        "[gone](missing.md)\n[anchor](other.md#nope)\n[outside](../../shared.md)\n[web](https://example.com/x)\n"
        "[abs](/docs/other.md)\n[line](../code.py#L3)\n[frag](../code.py#top)\n[self](#repeat)\n"
        "bare https://example.org/y here\n[ref][r]\n\n[r]: ../nothing.md\n"
        "| a | b |\n| --- | --- |\n| [cell](cell.md) | x |\n")
    found = problems(page, repo)
    expected_targets = ["missing.md", "other.md#nope", "../../shared.md", "https://example.com/x", "/docs/other.md",
                        "../code.py#L3", "../code.py#top", "#repeat", "https://example.org/y", "../nothing.md",
                        "cell.md"]
    assert [p.split("(", 1)[1].split(")", 1)[0] for p in found] == expected_targets, "\n".join(found)
    assert found[0].startswith("docs/page.md:13: ") and "no such file" in found[0]
    assert "outside the repository" in found[2] and "allow-list" in found[3]


@pytest.mark.parametrize("heading,slug", [
    ("`spoctl align` — staged SPO training", "spoctl-align--staged-spo-training"),
    ("`manifest.json`", "manifestjson"),
    ("7. Checks, and the tests that make them", "7-checks-and-the-tests-that-make-them"),
    ("5.3 Against TRL's `DPOTrainer`", "53-against-trls-dpotrainer"),
    ("`pairwise` — TRL's preference formats", "pairwise--trls-preference-formats"),
])
def test_github_slug(heading, slug):
    assert github_slug(_plain(_MD.parseInline(heading)[0])) == slug


def test_method_page_names_every_losses_function():
    """docs/method.md puts every formula beside the losses.py function that computes it: each public function
    of spoctl.losses is named there, and every `losses.NAME` in the docs exists."""
    method = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    public = {name for name, obj in vars(losses).items()
              if inspect.isfunction(obj) and obj.__module__ == losses.__name__ and not name.startswith("_")}
    assert {spec.fn.__name__ for spec in losses.LOSSES.values()} <= public
    missing = sorted(name for name in public if f"losses.{name}" not in method)
    assert not missing, f"docs/method.md does not name: {', '.join(missing)}"
    for doc in DOCS:
        for name in re.findall(r"\blosses\.([A-Za-z_]\w*)", doc.read_text(encoding="utf-8")):
            if name != "py":  # the file name losses.py
                assert hasattr(losses, name), f"{doc.relative_to(ROOT)} names losses.{name}, which does not exist"
