"""The model folder a user takes home: weights, tokenizer, decoding settings and a model card. It loads
without this project (`from_pretrained`, `pipeline`), its tokenizer gives tiktoken's `gpt2` ids, and
`generate` decodes as the notebook does."""

import inspect
from pathlib import Path
from types import SimpleNamespace

from medqa import gpt2_tokenizer
from medqa.batches import EOT
from medqa.generate import AnswerOnly, Decoding, describe_decoding
from medqa.model import HUB_IDS, merge_lora
from medqa.model_folder import RANDOM_SHAPES
from medqa.prompts import format_prompt
from medqa.reference_points import card_table
from medqa.settings import RUN_DEFINING
from medqa.store import save_model_atomic

SCORES = (("ROUGE-1 F1 (mean)", "rouge1"), ("ROUGE-L F1 (mean)", "rougeL"), ("BLEU (corpus, 0-100)", "bleu"),
          ("reference answers' loss", "loss"), ("reference answers' perplexity", "perplexity"))
# What defines the run, and how its answers were decoded.
CARD_SETTINGS = RUN_DEFINING + ("MAX_NEW_TOKENS", "TEMPERATURE", "REPETITION_PENALTY", "NO_REPEAT_NGRAM_SIZE")


def generation_config(decoding: Decoding):
    """The notebook's decoding (generate.answer) as `generate`'s defaults for this folder."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=decoding.max_new_tokens, bos_token_id=EOT, eos_token_id=EOT,
                            pad_token_id=EOT, **decoding.config_options())


def _fmt(value) -> str:
    if isinstance(value, dict):
        return _fmt(value.get("mean"))
    return "not measured" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _about(cfg, base: str | None, data: dict | None, split: dict) -> str:
    """The card's title and what the run was: model, data (no licence claimed for the user's own), split."""
    if base:
        origin = f"[{base}](https://huggingface.co/{base}), fine-tuned"
    elif cfg.MODEL in RANDOM_SHAPES:
        shape = RANDOM_SHAPES[cfg.MODEL]
        origin = (f"`{cfg.MODEL}`, a GPT-2-shaped model ({shape['n_layer']} layers of width "
                  f"{shape['n_embd']}) that started from random weights (**not pretrained GPT-2**: it knows "
                  f"only what this training taught it), trained")
    else:
        origin = f"the model in `{cfg.MODEL}`, fine-tuned"
    if cfg.LORA_R:
        origin += (f" with LoRA (rank {cfg.LORA_R}, alpha {cfg.LORA_ALPHA or 2 * cfg.LORA_R}; the adapters "
                   "are merged into these weights)")
    title, data_line = "data not recorded", "not recorded."
    read = data and f"`{data['file']}`, {data['rows']:,} rows read"
    if data and not data.get("medquad"):
        title, data_line = f"{data['file']}", (f"{read}: the user's own data, not MedQuAD. Its source and "
                                               "licence are whatever its owner states; this card claims "
                                               "none.")
    elif data:
        title, data_line = "MedQuAD (disease questions and answers)", (
            f"MedQuAD ({read}), 47,457 question-answer pairs from 12 U.S. National Institutes of Health "
            "websites: Asma Ben Abacha and Dina Demner-Fushman, \"A Question-Entailment Approach to Question "
            "Answering\", *BMC Bioinformatics* 20, 511 (2019), https://github.com/abachaa/MedQuAD, licensed "
            "under [CC BY 4.0](https://creativecommons.org/licenses/by/4.0/).")
    parts = " / ".join(f"{split.get(k, 'not recorded')}" for k in ("train", "validation", "test"))
    return f"""# GPT-2 fine-tuned on {title}

> **Not medical advice.** This model's answers come from a small language model. They are often wrong and must
> never be used to diagnose or treat anyone.

- **Model**: {origin} on these question-answer pairs, written by the notebook `llm.ipynb`.
- **Data**: {data_line}
- **Split** (train / validation / test examples): {parts}; shuffled with `SEED` = {cfg.SEED}, validation
  {cfg.VAL_FRACTION:.0%} and test {cfg.TEST_FRACTION:.0%}; rows that share a question or an answer (case,
  punctuation, hyphens and spaces aside) stay in one part, so the test set neither asks what training saw nor
  expects an answer training taught."""


def _scores(scores: dict) -> str:
    after, before = scores.get("after") or {}, scores.get("before") or {}
    rows = [f"| {name} | {_fmt(after.get(key))} | {_fmt(before.get(key))} |" for name, key in SCORES]
    note = f"\n\n{after['note']}" if after.get("note") else ""
    judge = (scores.get("judge") or {}).get("test_responses.json")
    judged = "not measured" if not judge or judge.get("mean") is None else (
        f"{judge['mean']} (judge `{judge.get('model')}`, {judge.get('scored')} answers scored, "
        f"{judge.get('unscored')} unscored)")
    return f"""## Scores on the test set

| score | after fine-tuning | before fine-tuning |
|---|---|---|
{chr(10).join(rows)}{note}

{card_table(scores.get("reference_points"))}

LLM judge (0-100, an Ollama model comparing each answer with the reference): {judged}.
The judge runs after this folder is saved; its score, with its sanity anchors, is in the run's `metrics.json`
(`evaluation.judge`, one result per answers file)."""


def _usage(cfg) -> str:
    settings = "\n".join(f"| `{name}` | `{getattr(cfg, name)!r}` |" for name in CARD_SETTINGS)
    example, decoding = format_prompt("What are the symptoms of glaucoma?"), Decoding.from_settings(cfg)
    return f"""## Settings of the run

| setting | value |
|---|---|
{settings}

## Prompt format

The model was trained on Alpaca-style prompts and answers after `### Response:`; it ends an answer with
`<|endoftext|>`. Ask it the same way:

```text
{example}```

## How to use it

```python
from transformers import {", ".join(["AutoModelForCausalLM", "AutoTokenizer", *decoding.answer_rules()])}


{inspect.getsource(AnswerOnly)}

folder = "OUTPUT_DIR/model"  # this folder
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
prompt = {example!r}
ids = tokenizer(prompt, return_tensors="pt")
width = ids["input_ids"].shape[1]
rules = [{", ".join(f"AnswerOnly({name}({arg!r}), width)" for name, arg in decoding.answer_rules().items())}]
out = model.generate(**ids, logits_processor=rules)  # the rest of the decoding is in generation_config.json
print(tokenizer.decode(out[0, width:], skip_special_tokens=True).strip())
```

The notebook's decoding is {describe_decoding(decoding)}, at most {cfg.MAX_NEW_TOKENS} new tokens, stopping
at `<|endoftext|>`. `generation_config.json` holds it, the rules over the answer only under names of their
own (`answer_repetition_penalty`, `answer_no_repeat_ngram_size`) that `generate` does not read: its
`repetition_penalty` and `no_repeat_ngram_size` would count the prompt too, and a MedQuAD answer repeats its
question's words. With the project installed,
`python -m medqa.ask --model {{this folder}} "What are the symptoms of glaucoma?"` answers as the notebook
does.
"""


def model_card(cfg, scores: dict | None = None, split: dict | None = None, data: dict | None = None) -> str:
    """README.md of the folder, a Hugging Face model card: `scores` as metrics.json's "evaluation", `split`
    the examples per part, `data` what was read (data.describe); what is missing reads "not measured"."""
    base = HUB_IDS.get(cfg.MODEL, cfg.MODEL if cfg.MODEL.startswith("openai-community/") else None)
    # MedQuAD's licence, language and dataset (the hub's copy) only for MedQuAD: other data is the user's.
    medquad = bool(data and data.get("medquad"))
    front = ["---"] + (["license: mit", "language:", "- en"] if medquad else [])
    front += ["library_name: transformers", "pipeline_tag: text-generation"]
    front += ["datasets:", "- lavita/MedQuAD"] if medquad else []
    front += ["tags:", "- gpt2"] + (["- medical", "- question-answering", "- medquad"] if medquad else [])
    front += (["- lora"] if cfg.LORA_R else []) + ([f"base_model: {base}"] if base else []) + ["---"]
    sections = [_about(cfg, base, data, split or {}), _scores(scores or {}), _usage(cfg)]
    return "\n".join(front) + "\n\n" + "\n\n".join(sections)


def save_model_folder(model, folder, cfg, scores: dict | None = None, split: dict | None = None,
                      data: dict | None = None) -> Path:
    """Write `folder` (OUTPUT_DIR/model) atomically: the weights (LoRA adapters merged into a copy, so that
    `model` keeps its adapters), tokenizer, generation config and model card (model_card's arguments)."""
    plain = merge_lora(model)
    parts = [plain, gpt2_tokenizer.for_transformers(plain.config.n_positions),
             generation_config(Decoding.from_settings(cfg))]  # the last replaces the model's own config
    card = model_card(cfg, scores, split, data)

    def save_pretrained(path) -> None:
        for part in parts:
            part.save_pretrained(path)
        (Path(path) / "README.md").write_text(card, encoding="utf-8")

    return save_model_atomic(SimpleNamespace(save_pretrained=save_pretrained), folder)
