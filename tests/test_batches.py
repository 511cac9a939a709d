import pandas as pd
import pytest
import torch

from medqa import data
from medqa.batches import (EOT, IGNORE, LengthGroupedBatches, QADataset, collate, encode_examples, sample_examples,
                           token_efficiency)
from medqa.prompts import format_prompt
from tests.conftest import table


def test_tokenizer_is_gpt2s(tokenizer):
    assert tokenizer.n_vocab == 50257
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("<|endoftext|>", allowed_special="all") == [EOT]


def test_collate_pads_with_eot_and_ignores_all_padding_but_the_first_eot():
    b = collate([([1, 2], [3, 4, 5]), ([6], [7])], max_length=100)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, EOT, EOT, EOT]]
    assert b["labels"].tolist() == [[2, 3, 4, 5, EOT], [7, EOT, IGNORE, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_collate_can_mask_the_prompt():
    b = collate([([1, 2, 3], [4, 5])], max_length=100, mask_prompt=True)
    # Targets of positions inside the prompt are ignored; the first answer token is the first target.
    assert b["labels"].tolist() == [[IGNORE, IGNORE, 4, 5, EOT]]


def test_collate_truncates_the_answer_tail_never_the_prompt():
    b = collate([([1, 2, 3], [4, 5, 6, 7, 8])], max_length=5)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["labels"].tolist() == [[2, 3, 4, 5, 6]]  # no end-of-text: the answer was cut, not finished


def test_dataset_drops_and_counts_prompts_that_do_not_fit():
    df = pd.DataFrame({"prompt_ids": [[1] * 3, [1] * 10, [1] * 9], "answer_ids": [[2] * 50, [2], [2] * 4]})
    ds = QADataset(df, max_length=10)
    assert len(ds) == 2 and ds.dropped == 1
    assert ds.lengths == [10, 10]  # 3 + 50 + 1 capped at 10; 9 + 4 + 1 capped at 10
    assert ds[1] == ([1] * 9, [2] * 4)


def test_encode_examples_formats_then_tokenizes(tokenizer):
    df = encode_examples(table([("What causes gout ?", "Uric acid.")]), tokenizer)
    assert tokenizer.decode(df.prompt_ids[0]).endswith("### Instruction:\nWhat causes gout ?\n\n### Response:\n")
    assert tokenizer.decode(df.answer_ids[0]) == "Uric acid."


def test_length_grouped_batches_cover_every_example_once_and_vary_by_epoch():
    lengths = [(i * 37) % 500 + 1 for i in range(1000)]
    s = LengthGroupedBatches(lengths, batch_size=8, seed=1)
    e0, e1 = s.batches(0), s.batches(1)
    for epoch in (e0, e1):
        flat = sorted(i for b in epoch for i in b)
        assert flat == list(range(1000))
        assert all(len(b) <= 8 for b in epoch)
    assert e0 != e1 and e0 == LengthGroupedBatches(lengths, 8, seed=1).batches(0)
    assert token_efficiency(lengths, e0) > 0.97


def test_sorted_batches_for_evaluation_are_longest_first():
    lengths = [5, 1, 9, 3]
    assert LengthGroupedBatches(lengths, 2, shuffle=False).batches(0) == [[2, 0], [3, 1]]


def test_token_efficiency_counts_padding():
    assert token_efficiency([4, 2], [[0, 1]]) == pytest.approx(6 / 8)


def test_the_validation_sample_is_fixed_seeded_and_drawn_from_the_whole_set():
    lengths = list(range(1, 201))  # answer lengths 1..200: the longest-first batches would hold only the longest
    ds = QADataset(pd.DataFrame({"prompt_ids": [[7]] * 200, "answer_ids": [[8] * n for n in lengths]}), 512)
    sample, info = sample_examples(ds, 40, seed=3)
    again, _ = sample_examples(ds, 40, seed=3)
    assert sample.pairs == again.pairs and sample.pairs != sample_examples(ds, 40, seed=4)[0].pairs
    assert len(sample) == 40 and len(set(map(str, sample.pairs))) == 40
    assert min(sample.lengths) < 50 and max(sample.lengths) > 150  # from the whole range, not one end of it
    assert info == {"examples": 40, "of": 200, "sampled": True, "seed": 3,
                    "mean_tokens": round(sum(sample.lengths) / 40, 1), "mean_tokens_of_all": 101.5}


def test_a_validation_set_no_larger_than_the_sample_is_used_whole():
    ds = QADataset(pd.DataFrame({"prompt_ids": [[7], [7, 7]], "answer_ids": [[8], [8, 8]]}), 512)
    sample, info = sample_examples(ds, 16, seed=0)
    assert sample.pairs == ds.pairs and (info["examples"], info["of"], info["sampled"]) == (2, 2, False)


# One real MedQuAD row (GHR, CC BY 4.0), as data.clean leaves it.
REAL_QUESTION = "How many people are affected by aceruloplasminemia ?"
REAL_ANSWER = ("Aceruloplasminemia has been seen worldwide, but its overall prevalence is unknown. Studies in Japan "
               "have estimated that approximately 1 in 2 million adults in this population are affected.")


def test_one_real_row_gives_the_recipes_prompt_ids_and_targets(tokenizer, tmp_path):
    path = tmp_path / "one.csv"
    pd.DataFrame({"question": [REAL_QUESTION], "answer": [REAL_ANSWER], "source": ["GHR"],
                  "focus_area": ["aceruloplasminemia"]}).to_csv(path, index=False)
    df, _ = data.clean(data.read_table(path))
    df = encode_examples(df, tokenizer)
    prompt, answer = df.prompt_ids[0], df.answer_ids[0]
    assert format_prompt(REAL_QUESTION) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHow many people are affected by aceruloplasminemia ?\n\n### Response:\n")
    assert (len(prompt), prompt[:6], prompt[-6:]) == (44, [21106, 318, 281, 12064, 326, 8477],
                                                      [198, 198, 21017, 18261, 25, 198])
    assert (len(answer), answer[:6], answer[-6:]) == (37, [32, 2189, 377, 20106, 292, 1084],
                                                      [287, 428, 3265, 389, 5676, 13])
    assert prompt + answer == tokenizer.encode(format_prompt(REAL_QUESTION) + REAL_ANSWER)  # the recipe: one text
    b = collate([(prompt, answer)], max_length=256)
    assert b["input_ids"][0].tolist() == prompt + answer and b["attention_mask"].sum() == 81
    labels = b["labels"][0].tolist()
    assert (len(labels), labels[:6], labels[-6:]) == (81, [318, 281, 12064, 326, 8477, 257],
                                                      [428, 3265, 389, 5676, 13, EOT])
    assert b["labels"][0].tolist() == prompt[1:] + answer + [EOT]  # unmasked: the prompt is learned too


def test_collates_docstring_examples_hold():
    import doctest

    from medqa import batches

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(batches.collate, "collate", globs={"collate": batches.collate}) if t.examples]
    for test in tests:
        runner.run(test)
    assert tests and runner.summarize(verbose=False).attempted >= 4
    assert runner.summarize(verbose=False).failed == 0


def test_example_lengths_count_prompt_answer_and_end_of_text_and_the_dataset_cuts_them():
    from medqa.batches import example_lengths

    df = pd.DataFrame({"prompt_ids": [[1] * 3, [1] * 5], "answer_ids": [[2] * 50, [2] * 2]})
    assert example_lengths(df) == [54, 8]
    assert QADataset(df, max_length=10).lengths == [10, 7]  # rows cut to MAX_LENGTH + 1, then shifted
