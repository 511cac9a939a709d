import pandas as pd
import pytest
import torch

from medqa import gpt2_tokenizer, model as gpt


@pytest.fixture(scope="session")
def tokenizer():
    return gpt2_tokenizer.get_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    folder = gpt.build_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "tiny-gpt2", seed=0)
    return gpt.load_model(str(folder), torch.device("cpu"))


def table(rows):
    """A common-format table from (question, answer) pairs."""
    return pd.DataFrame({"instruction": [q for q, _ in rows], "input": "", "output": [a for _, a in rows],
                         "source": "", "focus_area": ""})
