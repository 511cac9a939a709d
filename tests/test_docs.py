"""The README and docs/ stay honest: their links lead somewhere, the README stays a short guide, and the
commands it gives for setting up and testing are the ones CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
README_MAX_WORDS = 1700

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text a reader follows links in: without HTML comments, fenced code and inline code."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def code_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks, comments after `#` removed."""
    lines = []
    for block in FENCE.findall(text):
        lines += [line.split(" #")[0].strip() for line in block.splitlines()[1:-1]]
    return [line for line in lines if line]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a Markdown page whose file or heading does not exist, shown from `root`."""
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ... lead off the repository
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            shown = linked.relative_to(root) if root in linked.parents else linked
            broken.append(f"{target}: no file {shown}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


def ci_commands() -> list[str]:
    """The commands .ci/run runs, without its shell set-up (set, cd)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [c for c in commands if not c.startswith(("set ", "cd "))]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading) [gone](missing.md) [no such part](other.md#nowhere) "
                    "![picture](images/none.png) [web](https://example.com/x.md) `[code](not-a-link.md)`\n"
                    "<!-- [for later](later.png) -->\n")
    assert broken_links(page, root=tmp_path.resolve()) == [
        "missing.md: no file missing.md",
        "other.md#nowhere: no heading #nowhere in other.md",
        "images/none.png: no file images/none.png"]


def test_readme_is_a_guide_read_in_five_minutes():
    words = len(README.read_text(encoding="utf-8").split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words: move detail into docs/"


def test_every_docs_page_is_linked_from_the_readme():
    text = prose(README.read_text(encoding="utf-8"))
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(text)}
    assert PAGES, "docs/ holds no pages"
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


def test_readme_test_command_is_the_one_ci_runs():
    """The README shows .ci/run's test command verbatim, and its setup creates the same .venv."""
    commands = ci_commands()
    readme_code = code_lines(README.read_text(encoding="utf-8"))
    assert commands[-1] in readme_code, f".ci/run runs {commands[-1]!r}; the README does not show it"
    for command in commands[:-1]:
        assert any(line.startswith(command) for line in readme_code), f"the README never runs {command!r}"


def test_files_the_readme_installs_from_exist():
    text = "\n".join(code_lines(README.read_text(encoding="utf-8")))
    requirements = re.findall(r"-r\s+(\S+)", text)
    assert "requirements.txt" in requirements
    assert [name for name in requirements if not (ROOT / name).is_file()] == []
