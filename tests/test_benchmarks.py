"""The benchmark scripts stay runnable: each starts (imports everything it uses) and answers --help. Their
figures come from running them, not from tests."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_there_are_benchmarks():
    assert {p.name for p in SCRIPTS} >= {"bench.py", "profiles.py", "lora.py", "torch_compile.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_script_starts(script):
    if "--help" not in script.read_text() and "argparse" not in script.read_text():
        # no command line of its own: importing it is what can break
        code = f"import runpy; runpy.run_path({str(script)!r}, run_name='not_main')"
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    else:
        done = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
