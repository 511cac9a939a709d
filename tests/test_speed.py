"""The speed-ups change no numbers: grouped batches give the same per-example loss as random ones, and
batched KV-cache generation gives the same greedy answers as the textbook's one-at-a-time loop."""

import pandas as pd
import torch
import torch.nn.functional as F

from benchmarks.bench import textbook_batches, textbook_generate
from medqa.batches import IGNORE, LengthGroupedBatches, QADataset, collate
from medqa.generate import generate_ids


def per_example_loss(model, examples, order, max_length):
    """Loss of each example inside the given batches, unmasked as both ways train (right padding + causal)."""
    out = {}
    model.eval()
    with torch.no_grad():
        for idx in order:
            b = collate([examples[i] for i in idx], max_length)
            logits = model(input_ids=b["input_ids"]).logits
            losses = F.cross_entropy(logits.transpose(1, 2), b["labels"], ignore_index=IGNORE, reduction="none")
            for row, i in enumerate(idx):
                keep = b["labels"][row] != IGNORE
                out[i] = losses[row][keep].mean().item()
    return out


def test_grouped_and_random_batches_give_the_same_per_example_loss(tiny_model):
    g = torch.Generator().manual_seed(0)
    examples = QADataset(pd.DataFrame({
        "prompt_ids": [torch.randint(0, 50000, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(40)],
        "answer_ids": [torch.randint(0, 50000, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(40)]}), 100)
    grouped = per_example_loss(tiny_model, examples, LengthGroupedBatches(examples.lengths, 8, seed=1).batches(0), 100)
    textbook = per_example_loss(tiny_model, examples, textbook_batches(len(examples), 8, 1), 100)
    alone = per_example_loss(tiny_model, examples, [[i] for i in range(len(examples))], 100)  # no padding at all
    assert grouped.keys() == textbook.keys() == set(range(40))
    for i in range(40):
        assert abs(grouped[i] - textbook[i]) < 1e-4 and abs(grouped[i] - alone[i]) < 1e-4


def test_batched_generation_matches_the_textbook_loop(tiny_model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (3, 25, 11, 40)]
    textbook = [textbook_generate(tiny_model, p, 20) for p in prompts]
    assert generate_ids(tiny_model, prompts, 20, batch_size=4) == textbook
