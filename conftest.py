"""Test settings shared by the unit tests and nbval's run of llm.ipynb.

The notebook runs in the smoke profile, on the real MedQuAD copy in ../shared/data when it is there and on a
small sample the tests write otherwise, into a temporary OUTPUT_DIR. Nothing in data/ or runs/ is touched.
"""

import os
import tempfile
from pathlib import Path

SHARED_CSV = Path(__file__).resolve().parent.parent / "shared" / "data" / "medquad.csv"


def pytest_configure(config):
    from tests.sample_data import write_sample_csv

    work = Path(tempfile.mkdtemp(prefix="medqa-tests-"))
    for name in [k for k in os.environ if k.startswith("MEDQA_")]:
        del os.environ[name]  # a developer's own settings must not change what the tests check
    data_path = SHARED_CSV if SHARED_CSV.exists() else write_sample_csv(work / "sample.csv")
    os.environ.update({
        "MEDQA_PROFILE": "smoke",
        "MEDQA_DATA_PATH": str(data_path),
        "MEDQA_OUTPUT_DIR": str(work / "notebook-run"),
        "OLLAMA_HOST": "http://127.0.0.1:9",  # nothing listens there: the judge cell takes its 'unavailable' path
        "TOKENIZERS_PARALLELISM": "false",
        "XDG_CACHE_HOME": str(work / "cache"),  # the random models the notebook builds: not in the user's ~/.cache
    })
    config.medqa_data_path = data_path


def pytest_report_header(config):
    """The kernels this run computes with: tests/test_cpu_capabilities.py runs the numerical tests again with
    them capped below what the CPU has."""
    import torch

    return (f"CPU kernels: ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN "
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'all the CPU has')}")
