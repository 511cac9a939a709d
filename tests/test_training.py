"""Training: the loss falls, an interrupted run resumes to the same end, runs are never clobbered, NaN stops."""

import json
import math
from dataclasses import replace

import pytest
import torch

from medqa import batches, data, model as gpt, prompts, settings, train
from medqa.errors import MedQAError
from tests.sample_data import write_sample_csv


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("train")
    df, _ = data.clean(data.read_table(write_sample_csv(root / "m.csv")))
    df = batches.encode_examples(data.sample_rows(df, 120, 0), tokenizer)
    tr, va, _ = prompts.split_by_question(df, 0.1, 0.05, 0)
    s = settings.resolve({"PROFILE": "smoke", "MAX_LENGTH": 96, "BATCH_SIZE": 4, "GRAD_ACCUM": 2, "EPOCHS": 2,
                          "EVAL_EVERY": 3, "EVAL_BATCHES": 2, "CHECKPOINT_EVERY": 4, "WARMUP_STEPS": 2,
                          "DROPOUT": 0.1}, env={})  # dropout on: resuming must restore the random state too
    train_set, val_set = batches.QADataset(tr, s.MAX_LENGTH), batches.QADataset(va, s.MAX_LENGTH)
    val_loader = batches.make_loader(val_set, s.BATCH_SIZE, s.MAX_LENGTH, shuffle=False)
    source = str(gpt.build_tiny_gpt2(root / "tiny", seed=0))
    return s, train_set, val_loader, source


def run(setup, out_dir, dataset=None, **overrides):
    s, train_set, val_loader, source = setup
    s = replace(s, OUTPUT_DIR=str(out_dir), **overrides)
    model = gpt.load_model(source, torch.device("cpu"), s.DROPOUT)
    history = train.train(model, dataset or train_set, val_loader, s, out_dir, log=lambda *_: None)
    return model, history


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    return run(setup, tmp_path_factory.mktemp("a"))


def losses(history):
    return [v for h in history for v in (h["step"], h["tokens_seen"], h["train_loss"], h["val_loss"])]


def assert_same_run(a, b):
    (ma, ha), (mb, hb) = a, b
    assert losses(ha) == pytest.approx(losses(hb), rel=1e-5)
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_training_loss_falls(uninterrupted):
    _, history = uninterrupted
    assert len(history) >= 4 and history[-1]["train_loss"] < history[0]["train_loss"] - 0.5


def test_a_run_stopped_by_max_steps_resumes_to_the_same_end(setup, uninterrupted, tmp_path):
    _, partial = run(setup, tmp_path, MAX_STEPS=5)
    assert partial[-1]["step"] == 3  # stopped early
    assert_same_run(uninterrupted, run(setup, tmp_path))


class Crashing(torch.utils.data.Dataset):
    """The training set, until the n-th example is asked for: then the 'kernel dies'."""

    def __init__(self, base, n):
        self.base, self.n, self.lengths = base, n, base.lengths

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        return self.base[i]


def test_a_run_interrupted_by_an_exception_resumes_to_the_same_end(setup, uninterrupted, tmp_path):
    _, train_set, _, _ = setup
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path, dataset=Crashing(train_set, 4 * 2 * 7 + 3))  # during step 8, after the step-4 checkpoint
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 4
    assert_same_run(uninterrupted, run(setup, tmp_path))


def test_a_finished_run_is_not_trained_again(setup, uninterrupted, tmp_path):
    model, history = run(setup, tmp_path)
    again, history_again = run(setup, tmp_path)
    assert history_again == history
    assert_same_run((model, history), (again, history_again))


def test_other_settings_never_clobber_a_run(setup, tmp_path):
    s = replace(setup[0], OUTPUT_DIR=str(tmp_path))
    settings.claim_output_dir(s)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(MedQAError) as err:
        settings.claim_output_dir(replace(s, LEARNING_RATE=1e-4, SEED=5))
    message = str(err.value)
    for words in ("LEARNING_RATE: 0.005 there, 0.0001 now", "SEED: 123 there, 5 now", "OUTPUT_DIR", "OVERWRITE=True"):
        assert words in message
    assert (tmp_path / "metrics.json").exists() and json.loads((tmp_path / "run.json").read_text())["SEED"] == 123
    settings.claim_output_dir(replace(s, SEED=5, OVERWRITE=True))
    assert not (tmp_path / "metrics.json").exists() and json.loads((tmp_path / "run.json").read_text())["SEED"] == 5


def test_a_loss_that_is_not_finite_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    s, train_set, val_loader, source = setup
    s = replace(s, OUTPUT_DIR=str(tmp_path), EVAL_EVERY=3, CHECKPOINT_EVERY=2)
    model = gpt.load_model(source, torch.device("cpu"))
    run(setup, tmp_path, MAX_STEPS=2)
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"]
    with torch.no_grad():
        model.transformer.wte.weight.fill_(math.inf)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    ckpt["model"] = model.state_dict()
    torch.save(ckpt, tmp_path / "checkpoint.pt")  # a checkpoint whose weights give an infinite loss
    with pytest.raises(MedQAError, match="became nan at step 3.*last good checkpoint.*LEARNING_RATE"):
        train.train(model, train_set, val_loader, s, tmp_path, log=lambda *_: None)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == good
