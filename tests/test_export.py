"""The model folder stands on its own: transformers' tokenizer gives the notebook's tiktoken ids, `generate` with the
folder's settings stops where the notebook's answers stop (in a fresh process), and the card says what the run was."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medqa import batches, data, export, generate, gpt2_tokenizer, model as gpt, prompts, settings
from tests.sample_data import write_sample_csv

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "medquad.csv"
TRICKY = ["naïve café — Ménière's disease, 東京, 🙂 and ½", "two  spaces,   three,\ttab\r\nand\n\n\nnewlines  ",
          "the text <|endoftext|> inside a question", "<|endoftext|>", "   leading and trailing   ", "don't 'll 've",
          "1,000,000 mg/dL (≥ 5%)", "", "\u200b zero width and \u00a0 no-break space"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = REAL if REAL.exists() else write_sample_csv(tmp_path_factory.mktemp("d") / "m.csv")
    df, _ = data.clean(data.read_table(path))
    return data.sample_rows(df, 400, 0)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return gpt2_tokenizer.for_transformers()


def test_the_saved_tokenizer_gives_the_notebooks_ids(rows, tokenizer, tmp_path):
    gpt2_tokenizer.for_transformers().save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    texts = [prompts.format_prompt(q) for q in rows["instruction"]] + list(rows["output"]) + TRICKY
    expected = tokenizer.encode_ordinary_batch(texts)
    assert hf(texts)["input_ids"] == expected  # what pipeline("text-generation") calls too
    assert [hf.encode(t) for t in TRICKY] == expected[-len(TRICKY):]
    assert [hf.decode(ids) for ids in expected] == [tokenizer.decode(ids) for ids in expected]
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id, hf.model_max_length) == (50256, 50256, 50256, 1024)


@pytest.fixture(scope="module")
def ending_model(tmp_path_factory):
    """The tiny random model, made to write <|endoftext|> after a few tokens, so that answers end early."""
    folder = gpt.build_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "tiny-gpt2", seed=0)
    model = gpt.load_model(str(folder), torch.device("cpu"))
    with torch.no_grad():  # the output layer is tied to the embedding: a long end-of-text row makes it likely
        model.transformer.wte.weight[batches.EOT] *= 4
    return model


QUESTIONS = ["What are the symptoms of glaucoma?", "How is gout treated?", "What causes  Ménière's disease ?",
             "What is (are) Alder fever ?", "Is <|endoftext|> a disease?", "Who is at risk for Parkinson's Disease?"]


def smoke(**overrides):
    return settings.resolve({"PROFILE": "smoke", "MAX_NEW_TOKENS": 24, **overrides}, env={})


FRESH = r"""
import io, json, sys
from contextlib import redirect_stdout
from transformers import pipeline
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
card = open(f"{folder}/README.md", encoding="utf-8").read()
code = card.split("```python\n")[1].split("```")[0].replace('"OUTPUT_DIR/model"', repr(folder))
by_card, by_pipeline = [], []
pipe = pipeline("text-generation", model=folder)
for p in prompts:  # the model card's code, as it stands, on each prompt
    lines = [f"prompt = {p!r}" if line.startswith("prompt = ") else line for line in code.splitlines()]
    printed, namespace = io.StringIO(), {}
    with redirect_stdout(printed):
        exec("\n".join(lines), namespace)
    by_card.append(printed.getvalue().strip())
    rules = namespace["rules"]  # the same rules through a pipeline
    by_pipeline.append(pipe(p, return_full_text=False, logits_processor=rules)[0]["generated_text"].strip())
print(json.dumps({"card": by_card, "pipeline": by_pipeline}))
"""


@pytest.mark.parametrize("rules", [dict(NO_REPEAT_NGRAM_SIZE=4), dict(REPETITION_PENALTY=1.1, NO_REPEAT_NGRAM_SIZE=4)])
def test_a_saved_folder_answers_in_a_fresh_process_as_the_notebook_does(ending_model, tokenizer, tmp_path, rules):
    """The model card's code, run as it stands, gives the notebook's answers."""
    s = smoke(**rules)
    folder = export.save_model_folder(ending_model, tmp_path / "model", s)
    texts = [prompts.format_prompt(q) for q in QUESTIONS]
    ids = [tokenizer.encode_ordinary(t) for t in texts]
    new = generate.generate_ids(ending_model, ids, generate.Decoding.from_settings(s))
    assert any(0 < len(n) < s.MAX_NEW_TOKENS for n in new)
    assert any(len(n) == s.MAX_NEW_TOKENS for n in new) or s.REPETITION_PENALTY > 1
    notebook = generate.answer(ending_model, tokenizer, ids, generate.Decoding.from_settings(s))
    run = subprocess.run([sys.executable, "-c", FRESH, str(folder), json.dumps(texts)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    assert fresh["card"] == notebook
    assert fresh["pipeline"] == notebook


def test_the_generation_config_carries_the_notebooks_decoding(ending_model, tmp_path):
    from transformers import GenerationConfig

    greedy = GenerationConfig.from_pretrained(export.save_model_folder(ending_model, tmp_path / "a", smoke()))
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.answer_repetition_penalty,
            greedy.answer_no_repeat_ngram_size) == (False, 24, 1.0, 3)
    assert (greedy.eos_token_id, greedy.pad_token_id) == (50256, 50256)
    s = smoke(TEMPERATURE=0.7, REPETITION_PENALTY=1.3, MAX_NEW_TOKENS=99)
    sampled = GenerationConfig.from_pretrained(export.save_model_folder(ending_model, tmp_path / "b", s))
    assert (sampled.do_sample, sampled.temperature, sampled.max_new_tokens, sampled.answer_repetition_penalty) == \
        (True, 0.7, 99, 1.3)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_model_card_says_what_the_run_was():
    scores = {"after": {"rouge1": {"mean": 0.2345, "median": 0.2, "n": 9}, "rougeL": {"mean": 0.1234},
                        "bleu": 3.21, "loss": 2.5, "perplexity": 12.18},
              "before": {"rouge1": {"mean": None, "n": 0}, "bleu": 1.5}, "judge": None}
    s = settings.resolve({"PROFILE": "cpu", "LORA_R": 16, "SEED": 7}, env={})
    medquad = {"file": "medquad.csv", "rows": 16407, "medquad": True}
    card = export.model_card(s, scores, {"train": 850, "validation": 100, "test": 50}, medquad)
    meta = front_matter(card)
    assert meta["base_model"] == "openai-community/gpt2" and meta["license"] and meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] and meta["language"] == ["en"] and "lora" in meta["tags"]
    for words in ("Not medical advice", "CC BY 4.0", "BMC Bioinformatics", "850 / 100 / 50", "`SEED` = 7",
                  "| ROUGE-L F1 (mean) | 0.1234 | not measured |", "| ROUGE-1 F1 (mean) | 0.2345 | not measured |",
                  "| BLEU (corpus, 0-100) | 3.21 | 1.5 |",
                  "LLM judge", "rank 16, alpha 32", "### Response:", "AutoTokenizer",
                  "| `LEARNING_RATE` | `5e-05` |"):
        assert words in card, words
    assert "judge (0-100, an Ollama model comparing each answer with the reference): not measured" in card


def test_the_card_of_a_random_model_claims_no_base_model():
    card = export.model_card(smoke())
    assert "base_model" not in front_matter(card) and "not pretrained GPT-2" in card
    assert card.count("not measured") == 12  # five scores before and after, the reference points, the judge


def test_an_interrupted_save_keeps_the_folder_that_was_there(ending_model, tmp_path, monkeypatch):
    folder = export.save_model_folder(ending_model, tmp_path / "model", smoke())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    class Broken:
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    monkeypatch.setattr(gpt2_tokenizer, "for_transformers", lambda *_: Broken())
    with pytest.raises(KeyboardInterrupt):
        export.save_model_folder(ending_model, folder, smoke(MAX_NEW_TOKENS=5))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("data_read", [{"file": "mine.json", "rows": 300, "medquad": False},
                                       {"file": "zh.csv", "rows": 1234, "medquad": False}, None])
def test_the_card_of_other_data_names_that_data_and_claims_no_medquad_licence(data_read):
    card = export.model_card(smoke(), None, None, data_read)
    meta = front_matter(card)
    assert "datasets" not in meta and "license" not in meta and "language" not in meta
    assert "medquad" not in meta["tags"]
    for words in ("CC BY 4.0", "BMC Bioinformatics", "47,457", "MedQuAD question-answer pairs"):
        assert words not in card, words
    if data_read:
        assert f"`{data_read['file']}`, {data_read['rows']:,} rows read: the user's own data" in card
        assert f"# GPT-2 fine-tuned on {data_read['file']}" in card


def test_the_card_of_medquad_names_the_file_read_and_cites_medquad():
    card = export.model_card(smoke(), None, None, {"file": "medquad.csv", "rows": 16407, "medquad": True})
    assert "MedQuAD (`medquad.csv`, 16,407 rows read)" in card and "CC BY 4.0" in card
    assert front_matter(card)["datasets"] == ["lavita/MedQuAD"]


def test_the_card_says_when_the_scores_see_little_of_the_text():
    note = "ROUGE and BLEU see only 10% of the reference answers' characters: ..."
    card = export.model_card(smoke(), {"after": {"rougeL": {"mean": 0.5}, "note": note}})
    assert note in card
