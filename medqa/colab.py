"""On Google Colab only: install what the project needs and Colab lacks, and keep what Colab has. The
notebook's first cell runs this file (`runpy.run_path`) before the project's packages are installed: it uses
the standard library only, and never imports the package around it."""

import json
import re
import subprocess
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

# Colab's own packages stay as they are: its torch is built for its GPU, google-colab pins the others, and
# replacing any can force a restart. They are installed (pinned) only where missing, and a pip constraint
# keeps a dependency from replacing them; the project's own packages are installed at their pinned versions.
KEEP = ("torch", "numpy", "pandas", "matplotlib", "tqdm", "scipy", "platformdirs")


def run(cmd: list[str], what: str) -> None:
    """Runs cmd; if it fails, stops with one line: what failed, and the command's own first error line."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        said = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in said if line.lower().startswith(("error", "fatal"))] or said[-1:]
        raise RuntimeError(f"{what} failed: {errors[0] if errors else f'exit status {done.returncode}'}")


def dist(name: str) -> str:
    """pip's spelling of a package name: "rouge_score" and "Rouge-Score" are "rouge-score"."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    """The installed version of a package, or None."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def wanted(pin: str) -> bool:
    """Whether to install a requirements line: not jupyter (Colab has its own server), nor a kept package."""
    name = dist(re.split(r"[=<>!~;\[ ]", pin)[0])
    return name != "jupyter" and not (name in KEEP and installed(name))


def install(requirements: str = "requirements.txt") -> None:
    """Install the requirements Colab lacks; stop for a restart where pip replaced an imported module."""
    with open(requirements) as f:
        pins = [p for p in (line.split("#")[0].strip() for line in f) if p and wanted(p)]
    kept = [f"{n}=={installed(n)}" for n in KEEP if installed(n)]
    print(f"installing {' '.join(pins)}; keeping Colab's {' '.join(kept)}")
    with tempfile.TemporaryDirectory() as tmp:
        constraints, report = Path(tmp, "constraints.txt"), Path(tmp, "report.json")
        constraints.write_text("".join(k + "\n" for k in kept))
        run([sys.executable, "-m", "pip", "install", "-q", "-c", str(constraints), "--report", str(report),
             *pins], f"pip install of {requirements}")
        replaced = {dist(p["metadata"]["name"]) for p in json.loads(report.read_text())["install"]}
    # a module imported before pip replaced its files keeps the old code in this session (or breaks it): going
    # on would run the notebook against a mix of old and new code
    stale = sorted(m for m, names in packages_distributions().items()
                   if m in sys.modules and replaced & {dist(n) for n in names})
    if stale:  # SystemExit: one line, no traceback, and "Run all" stops at this cell
        raise SystemExit(f"Restart the session (Runtime → Restart session), then run the notebook again: pip "
                         f"replaced {', '.join(stale)}, already imported in this session.")


if __name__ == "__main__":
    install()
