"""What MODEL may name: a model the project knows by name, or a folder saved with `save_pretrained` holding
GPT-2 weights that load (checked before any data is prepared, by the notebook and by medqa.ask)."""

from __future__ import annotations

from pathlib import Path

from medqa import store
from medqa.errors import require

# Pretrained GPT-2 on the Hugging Face hub.
HUB_IDS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
           "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
TINY_MODEL = "tiny"  # the smoke profile's: GPT-2's vocabulary and context, two small layers
# GPT-2's shapes with random weights, built locally: they cost what the real ones cost (time, memory) and
# answer noise, for measuring without a network; never reported as GPT-2 results.
RANDOM_SHAPES = {TINY_MODEL: dict(n_layer=2, n_head=2, n_embd=64),
                 "random-gpt2-mini": dict(n_layer=4, n_head=4, n_embd=128),
                 "random-gpt2-mini-deep": dict(n_layer=8, n_head=4, n_embd=128),  # the demo profile's
                 "random-gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # GPT-2's (124M)
                 "random-gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024)}  # gpt2-medium's (355M)
KNOWN_MODELS = tuple(HUB_IDS) + tuple(RANDOM_SHAPES)


def check_model_folder(folder, label: str = "MODEL", how: str | None = None) -> Path:
    """`folder` holds GPT-2 weights that load, checked from config.json and the weight files' headers and
    sizes without reading the weights. `label` (MODEL, --model) and `how` (the fix) are for the messages."""
    folder = Path(folder)
    value = str(folder)
    how = how or (f"point {label} at a folder saved with save_pretrained from a GPT-2 model, or use one of "
                  f"{list(KNOWN_MODELS)}")
    fix = how[0].upper() + how[1:]
    require(folder.is_dir(), f"{label}={value!r}: no such folder. {fix}.")
    require((folder / "config.json").is_file(),
            f"{label}={value!r} is a folder without config.json, so it holds no saved model: it was not "
            f"saved with save_pretrained (or the copy is incomplete). {fix}.")
    config = store.read_json(folder / "config.json", f"Fix: {how}.")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    require(model_type == "gpt2",
            f"{label}={value!r} holds a {model_type!r} model (config.json), not GPT-2: this notebook "
            f"fine-tunes GPT-2 with GPT-2's tokenizer and context; {how}.")
    weights = [p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin") and p.is_file()]
    require(bool(weights),
            f"{label}={value!r} holds no weights (model.safetensors or pytorch_model.bin): {how}.")
    for p in weights:
        problem = store.safetensors_problem(p) if p.suffix == ".safetensors" else store.zip_problem(p)
        require(problem is None, f"{label}={value!r}: {p.name} {problem}; the copy is damaged or incomplete. "
                                 f"Copy or save the folder again, or {how}.")
    return folder
