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


# ---------------------------------------------------------------- claims that can drift, held against the code

NOTEBOOK = ROOT / "llm.ipynb"
FREE_GIB = {16: 14.6, 8: 7.2}  # what torch.cuda.mem_get_info leaves on a fresh card (a Colab T4; an 8 GB card)


def notebook() -> dict:
    import json

    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def notebook_markdown() -> str:
    return "\n".join("".join(c["source"]) for c in notebook()["cells"] if c["cell_type"] == "markdown")


def profile_rows(text: str) -> dict[str, list[str]]:
    """The rows of a Markdown table of profiles: {profile: its cells after the first}."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`(\w+)`\s*\|(.*)\|\s*$", line)
        if match and match.group(1) in ("smoke", "demo", "cpu", "full"):
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


@pytest.mark.parametrize("where", ["README.md", "llm.ipynb"])
def test_the_tables_of_profiles_say_what_settings_profiles_sets(where):
    from medqa.settings import PROFILES

    rows = profile_rows(README.read_text(encoding="utf-8") if where == "README.md" else notebook_markdown())
    assert set(rows) == set(PROFILES), f"{where}'s table of profiles names {sorted(rows)}"
    for name, (model, examples, max_length, epochs, *_) in rows.items():
        profile = PROFILES[name]
        assert model.startswith(f"`{profile['MODEL']}`"), f"{where}: {name}'s model is {profile['MODEL']}"
        n = profile["N_SAMPLES"]
        assert examples.startswith("all") if n is None else examples == f"{n:,}", f"{where}: {name}: {examples}"
        assert (max_length, epochs) == (str(profile["MAX_LENGTH"]), str(profile["EPOCHS"])), f"{where}: {name}"


@pytest.mark.parametrize("where", ["README.md", "llm.ipynb"])
def test_the_rule_for_which_cuda_cards_get_full_is_the_codes(where):
    """The sentence after `PROFILE = None` names a card that gets `full` and one that gets `cpu`;
    hardware.choose_profile decides the same for the memory such a card has free."""
    from medqa import hardware

    text = README.read_text(encoding="utf-8") if where == "README.md" else notebook_markdown()
    found = re.search(r"With `PROFILE = None`,(.*?)\n\n", text, re.S)
    assert found, f"{where} has no sentence 'With `PROFILE = None`, ...' saying which hardware gets which profile"
    rule = " ".join(found.group(1).split())
    full, cpu = re.findall(r"a (\d+) GB T4 has it", rule), re.findall(r"an? (\d+) GB card", rule)
    assert full and cpu and "`full`" in rule and "`cpu`" in rule, f"{where}: {rule!r}"
    for gb, expected in [(int(g), "full") for g in full] + [(int(g), "cpu") for g in cpu]:
        assert gb in FREE_GIB, f"{where} names a {gb} GB card: add the memory such a card has free to FREE_GIB"
        caps = hardware.Capabilities("cuda", f"a {gb} GB card", False, int(FREE_GIB[gb] * 2**30), (7, 5))
        assert hardware.choose_profile(caps)[0] == expected, f"{where}: a {gb} GB card gets {expected}?"


def test_the_reference_points_are_named_as_the_code_names_them():
    from medqa.reference_points import MEANING, NAMES

    readme = README.read_text(encoding="utf-8")
    header = next(line for line in readme.splitlines() if line.startswith("|") and "`random answer`" in line)
    assert [n for n in NAMES if f"`{n}`" not in header] == []
    beaten = re.search(r"beating (`[^`]+` and `[^`]+`) means", MEANING).group(1)
    assert re.search(rf"Beating {beaten} means", readme), f"the README must say what beating {beaten} means"
    assert " ".join(MEANING.split()) in " ".join(notebook_markdown().split())


def test_every_module_command_named_has_a_main():
    texts = [README.read_text(encoding="utf-8"), notebook_markdown(), *(p.read_text(encoding="utf-8") for p in PAGES)]
    named = set(re.findall(r"python -m medqa\.(\w+)", "\n".join(texts)))
    assert named, "no `python -m medqa.X` found"
    missing = [m for m in sorted(named) if not (ROOT / "medqa" / f"{m}.py").is_file()
               or 'if __name__ == "__main__":' not in (ROOT / "medqa" / f"{m}.py").read_text(encoding="utf-8")]
    assert missing == [], f"python -m medqa.X named, but medqa/X.py has no __main__: {missing}"


def recorded_seconds() -> float:
    """How long the stored run took, from the first cell's start to the last cell's reply, as the notebook
    recorded them."""
    from datetime import datetime

    times = [c["metadata"].get("execution", {}) for c in notebook()["cells"] if c["cell_type"] == "code"]
    starts = [t["iopub.execute_input"] for t in times if "iopub.execute_input" in t]
    ends = [t["shell.execute_reply"] for t in times if "shell.execute_reply" in t]
    assert starts and ends, "the stored notebook records no execution times: store it from a run"
    read = lambda stamp: datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # noqa: E731
    return (max(map(read, ends)) - min(map(read, starts))).total_seconds()


@pytest.mark.parametrize("page", ["README.md", "docs/speed.md"])
def test_the_demos_run_time_is_the_stored_runs(page):
    """The time quoted for the whole demo notebook is the stored run's (nbconvert adds the kernel's start and
    the notebook's writing: up to 30 s)."""
    recorded = recorded_seconds()
    row = next(line for line in (ROOT / page).read_text(encoding="utf-8").splitlines()
               if line.startswith("| `demo`"))
    quoted = re.search(r"(\d+) min (\d+) s for the whole notebook", row)
    assert quoted, (f"{page}: the demo's row gives no time for the whole notebook; the stored run took "
                    f"{int(recorded // 60)} min {round(recorded % 60)} s (cell times), plus nbconvert's start")
    seconds = int(quoted.group(1)) * 60 + int(quoted.group(2))
    assert -2 <= seconds - recorded <= 30, f"{page} quotes {quoted.group(0)}; the stored run took {recorded:.0f} s"


def test_the_readmes_scores_are_the_stored_runs():
    """The README's ROUGE-L row is what the stored notebook printed under its score table."""
    printed = "".join("".join(o.get("text", "")) for c in notebook()["cells"] if c["cell_type"] == "code"
                      and "readings.verdict" in "".join(c["source"]) for o in c["outputs"])
    line = next((ln for ln in printed.splitlines() if ln.startswith("ROUGE-L")), None)
    assert line, "the stored notebook prints no verdict under its scores: store it from a run"
    stored = [re.search(r"the model's ([\d.]+)", line).group(1)]
    from medqa.reference_points import NAMES

    stored += [re.search(rf"{name} \(([\d.]+)\)", line).group(1) for name in NAMES]
    readme = README.read_text(encoding="utf-8").splitlines()
    header = next(i for i, ln in enumerate(readme) if ln.startswith("|") and "`random answer`" in ln)
    assert [c.strip() for c in readme[header + 2].strip("|").split("|")] == stored
