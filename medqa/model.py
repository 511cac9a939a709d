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
    hf_logging.disable_progress_bar()  # the notebook shows its own progress; these bars only clutter it
    rates = {} if dropout is None else dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    try:
        model = GPT2LMHeadModel.from_pretrained(source, attn_implementation="sdpa", **rates)
    except OSError as err:
        raise MedQAError(
            f"Could not load GPT-2 weights from {source!r} ({str(err).splitlines()[0]}). Without a network, "
            "either set PROFILE=smoke (a tiny random GPT-2 built locally) or MODEL=<a local folder saved with "
            "save_pretrained>.") from None
    return model.to(device)


def check_fits(max_length: int, model: GPT2LMHeadModel) -> None:
    context = model.config.n_positions
    if max_length > context:
        raise MedQAError(f"MAX_LENGTH={max_length} is longer than the model's context of {context} tokens: "
                         f"set MAX_LENGTH to at most {context}.")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# GPT-2's projections, all Conv1D layers: attention's c_attn (q, k, v) and c_proj, the MLP's c_fc and c_proj.
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


def apply_lora(model, r: int, alpha: int | None = None, dropout: float = 0.0, seed: int = 0):
    """The model wrapped with trainable low-rank adapters (peft); every original weight is frozen.

    `alpha` None means 2 * r. GPT-2 keeps its projection weights as (in, out), hence fan_in_fan_out. The adapters'
    random start depends on `seed` alone (not on whatever drew random numbers before), so that a run started again
    starts alike. Only the adapters require gradients, so train.make_optimizer builds AdamW over them alone, and
    the training checkpoint (the wrapper's state_dict, frozen weights included) resumes as full fine-tuning does.
    """
    import warnings

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=LORA_TARGETS, fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")
    device = next(model.parameters()).device
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        torch.manual_seed(seed)
        # peft 0.21 reads a transformers 5 attribute that warns of its own renaming
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def merge_lora(model):
    """A plain GPT2LMHeadModel with the adapters added into a copy of its weights; a model without adapters as it is.

    A copy, so that the model keeps its adapters: a re-run training cell resumes from a LoRA checkpoint into it.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
