"""Step 7: the device and GPT-2, loaded with `from_pretrained` from the Hugging Face hub or a local folder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from medqa.errors import MedQAError
from medqa.settings import TINY_MODEL

HUB_IDS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
           "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def build_tiny_gpt2(folder, seed: int) -> Path:
    """A randomly initialised GPT-2 with GPT-2's vocabulary and context but two small layers, saved like a
    downloaded model so that it loads through the very same `from_pretrained` path. For tests and offline
    runs only: its answers are noise and its numbers are not GPT-2's."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=64, n_layer=2, n_head=2)
    tmp = folder.with_name(folder.name + ".tmp")
    hf_logging.disable_progress_bar()
    GPT2LMHeadModel(config).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def model_source(model: str, output_dir, seed: int) -> str:
    """What to pass to `from_pretrained`: a hub id, or a local folder (the tiny model is built on first use)."""
    if model == TINY_MODEL:
        return str(build_tiny_gpt2(Path(output_dir) / "tiny-gpt2", seed))
    return HUB_IDS.get(model, model)


def load_model(source: str, device: torch.device, dropout: float | None = None) -> GPT2LMHeadModel:
    """`GPT2LMHeadModel.from_pretrained` on a hub id or a folder, with PyTorch's fused attention.

    `dropout` replaces GPT-2's three dropout rates (0.1 each) when given; None keeps what the folder says.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import enable_progress_bars

    hf_logging.disable_progress_bar()  # transformers' own loading bars only clutter the notebook ...
    if not constants.HF_HUB_DISABLE_PROGRESS_BARS:  # ... unless the user turned them off,
        enable_progress_bars()  # a download of up to 6 GB shows that it moves (the call above hid its bar too)
    rates = {} if dropout is None else dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    try:
        model = GPT2LMHeadModel.from_pretrained(source, attn_implementation="sdpa", **rates)
    except Exception as err:  # noqa: BLE001 - safetensors, torch and transformers each raise their own types
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        if isinstance(err, OSError):
            raise MedQAError(
                f"Could not load GPT-2 weights from {source!r} ({first}). Without a network, either set "
                "PROFILE=smoke (a tiny random GPT-2 built locally) or MODEL=<a local folder saved with "
                "save_pretrained>.") from None
        raise MedQAError(
            f"The model in {source!r} does not load as GPT-2 ({type(err).__name__}: {first}). Its files are damaged "
            "or hold another model: save or copy the folder again, or set MODEL to one of gpt2, gpt2-medium, ... "
            "or tiny.") from None
    return model.to(device)


def check_fits(max_length: int, model: GPT2LMHeadModel) -> None:
    context = model.config.n_positions
    if max_length > context:
        raise MedQAError(f"MAX_LENGTH={max_length} is longer than the model's context of {context} tokens: "
                         f"set MAX_LENGTH to at most {context}.")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
