"""GPT-2, loaded with `from_pretrained` from the Hugging Face hub or a local folder."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import platformdirs
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import enable_progress_bars
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from medqa.errors import MedQAError
from medqa.model_folder import HUB_IDS, RANDOM_SHAPES, TINY_MODEL
from medqa.store import save_model_atomic


def cache_root() -> Path:
    """Where locally built models live (on Linux $XDG_CACHE_HOME or ~/.cache, then medqa/random-init): outside
    OUTPUT_DIR, so that OVERWRITE never deletes them and nothing is written there before the run claims it."""
    return platformdirs.user_cache_path("medqa", appauthor=False) / "random-init"


def build_random_gpt2(folder, shape: dict, seed: int) -> Path:
    """A randomly initialised GPT-2 of the given shape, saved like a downloaded model so that it loads through
    the very same `from_pretrained` path. Its answers are noise and its numbers are not GPT-2's."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=50257, n_positions=1024, **shape)
        folder.parent.mkdir(parents=True, exist_ok=True)
        hf_logging.disable_progress_bar()  # a bar for writing a few MB would only clutter the notebook
        save_model_atomic(GPT2LMHeadModel(config), folder)
    return folder


def build_tiny_gpt2(folder, seed: int) -> Path:
    """The `smoke` profile's model, for tests and offline runs."""
    return build_random_gpt2(folder, RANDOM_SHAPES[TINY_MODEL], seed)


def model_source(model: str, seed: int, cache_dir=None) -> str:
    """What to pass to `from_pretrained`: a hub id, or a local folder (random models are built on first use,
    one folder per name and seed, so that another seed never reuses them)."""
    if model in RANDOM_SHAPES:
        folder = Path(cache_dir or cache_root()) / f"{model}-seed{seed}"
        return str(build_random_gpt2(folder, RANDOM_SHAPES[model], seed))
    return HUB_IDS.get(model, model)


# GPT-2's GELU as one fused op. `gelu_new`, its config's default, is the same tanh approximation written out
# in Python, which keeps three more 4 * n_embd tensors per layer for the backward pass (medqa.hardware's
# ACTIVATION_BYTES counts the fused op); the values agree to rounding (tests/test_memory_plan.py).
ACTIVATION = "gelu_pytorch_tanh"


def load_model(source: str, device: torch.device, dropout: float | None = None) -> GPT2LMHeadModel:
    """`GPT2LMHeadModel.from_pretrained` with PyTorch's fused attention, the fused GELU for GPT-2's own, and
    `dropout` (when given) for GPT-2's three dropout rates. The weights load as fp32 whatever the files hold:
    fp32 master weights under autocast, where small updates do not round away and fp16's scaler unscales."""
    hf_logging.disable_progress_bar()  # transformers' own loading bars only clutter the notebook ...
    if not hub_constants.HF_HUB_DISABLE_PROGRESS_BARS:  # ... unless the user turned them off,
        enable_progress_bars()  # a download of a few GiB shows that it moves (the call above hid its bar)
    rates = {} if dropout is None else dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    try:
        config = GPT2Config.from_pretrained(source, **rates)
        if config.activation_function == "gelu_new":  # a folder saved with another activation keeps it
            config.activation_function = ACTIVATION
        model = GPT2LMHeadModel.from_pretrained(source, config=config, attn_implementation="sdpa",
                                                dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - safetensors, torch and transformers each raise their own types
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        if isinstance(err, OSError):
            raise MedQAError(
                f"Could not load GPT-2 weights from {source!r} ({first}). Without a network, either set "
                "PROFILE=smoke (a tiny random GPT-2 built locally) or MODEL=<a local folder saved with "
                "save_pretrained>.") from None
        raise MedQAError(
            f"The model in {source!r} does not load as GPT-2 ({type(err).__name__}: {first}). Its files are "
            "damaged or hold another model: save or copy the folder again, or set MODEL to one of gpt2, "
            "gpt2-medium, ... or tiny.") from None
    return model.to(device)


def check_max_length(max_length: int, model: GPT2LMHeadModel) -> None:
    """MAX_LENGTH within the model's context."""
    context = model.config.n_positions
    if max_length > context:
        raise MedQAError(f"MAX_LENGTH={max_length} is longer than the model's context of {context} tokens: "
                         f"set MAX_LENGTH to at most {context}.")


def enable_checkpointing(model) -> None:
    """Gradient checkpointing: each layer keeps only its input and recomputes the rest in the backward pass;
    non-reentrant, so that it needs no input that requires gradients and works with LoRA's frozen weights."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model) -> int:
    """All the model's parameters, frozen ones included."""
    return sum(p.numel() for p in model.parameters())


def count_trainable(model) -> int:
    """The parameters that require gradients (the adapters alone under LoRA)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# GPT-2's projections, all Conv1D layers: attention's c_attn (q, k, v) and c_proj, the MLP's c_fc and c_proj.
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


def apply_lora(model, r: int, alpha: int | None = None, dropout: float = 0.0, seed: int = 0):
    """The model wrapped with trainable low-rank adapters (peft), every original weight frozen; `alpha` None
    means 2 * r. GPT-2 keeps its projection weights as (in, out), hence fan_in_fan_out. The adapters' random
    start depends on `seed` alone, so that a run started again starts alike."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=LORA_TARGETS, fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")
    device = next(model.parameters()).device
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        torch.manual_seed(seed)
        # peft reads `is_gradient_checkpointing`, which transformers marks as renamed: a warning about peft's
        # code, with nothing for the user to change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def merge_lora(model):
    """A plain GPT2LMHeadModel with the adapters added into a copy of its weights (the model keeps its
    adapters: a re-run training cell resumes from a LoRA checkpoint into it); one without them as it is."""
    from peft import PeftModel

    return copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model
