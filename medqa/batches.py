"""Tokenized examples, a Dataset, the collate function and length-grouped batches."""

import random
import statistics
from functools import partial

import torch
from torch.utils.data import DataLoader, Dataset

from medqa.errors import MedQAError
from medqa.prompts import format_prompt

EOT = 50256  # GPT-2's <|endoftext|>: ends every answer and pads every batch
IGNORE = -100  # targets the loss skips (PyTorch's cross_entropy default ignore_index)


def encode_examples(df, tokenizer):
    """Format every row as an Alpaca prompt and tokenize it, once for the whole run (adds two columns)."""
    prompts = [format_prompt(i, x) for i, x in zip(df["instruction"], df["input"])]
    return df.assign(prompt_ids=tokenizer.encode_ordinary_batch(prompts),
                     answer_ids=tokenizer.encode_ordinary_batch(list(df["output"])))


def example_lengths(df) -> list[int]:
    """Tokens per example, before any cut: prompt + answer + the <|endoftext|> that ends it."""
    return [len(p) + len(a) + 1 for p, a in zip(df["prompt_ids"], df["answer_ids"])]


class QADataset(Dataset):
    """Tokenized examples whose prompt leaves room to learn an answer (is shorter than `max_length`)."""

    def __init__(self, df, max_length: int):
        fits = df["prompt_ids"].map(len) < max_length
        self.frame = df[fits].reset_index(drop=True)
        self.max_length = max_length
        self.dropped = int((~fits).sum())
        if len(df) and self.frame.empty:
            raise MedQAError(f"MAX_LENGTH={max_length} is too short for any prompt: all {len(df)} prompts "
                             f"are longer. Raise MAX_LENGTH (the profiles use 128 to 1024).")
        self.pairs = list(zip(self.frame["prompt_ids"], self.frame["answer_ids"]))
        # The length a training row has after collate's truncation: what batching groups by.
        self.lengths = [min(n, max_length + 1) - 1 for n in example_lengths(self.frame)]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def collate(batch, max_length: int, mask_prompt: bool = False, pad_id: int = EOT):
    """Pad a batch of (prompt_ids, answer_ids) into inputs and next-token targets.

    Each row is prompt + answer + <|endoftext|>, cut at the answer's tail to `max_length` + 1 tokens, then
    shifted by one. Padding (also <|endoftext|>, 50256) has target -100, except the first end-of-text, which
    the model must learn to write. With `mask_prompt`, the prompt's targets are -100 too.

    >>> batch = collate([([1, 2], [3, 4, 5]), ([6], [7])], max_length=100)
    >>> batch["input_ids"]
    tensor([[    1,     2,     3,     4,     5],
            [    6,     7, 50256, 50256, 50256]])
    >>> batch["labels"]
    tensor([[    2,     3,     4,     5, 50256],
            [    7, 50256,  -100,  -100,  -100]])
    >>> batch["attention_mask"]
    tensor([[1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0]])
    >>> collate([([1, 2, 3], [4, 5])], max_length=100, mask_prompt=True)["labels"]
    tensor([[ -100,  -100,     4,     5, 50256]])
    """
    rows, starts = [], []
    for prompt, answer in batch:
        rows.append((list(prompt) + list(answer) + [pad_id])[: max_length + 1])
        starts.append(len(prompt))
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts)):
        n = len(row) - 1
        inputs[i, :n] = torch.tensor(row[:-1])
        targets[i, :n] = torch.tensor(row[1:])
        mask[i, :n] = 1
        if mask_prompt:
            targets[i, : start - 1] = IGNORE
    return {"input_ids": inputs, "attention_mask": mask, "labels": targets}


class LengthGroupedBatches:
    """Batches of similar length: shuffled, sorted within windows of `window` batches, the batches shuffled.
    The order is a pure function of (seed, epoch): a resumed run sees the batches of an uninterrupted one."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, shuffle: bool = True, window: int = 64):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.shuffle, self.window = shuffle, window

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`, each a list of example indices."""
        idx = list(range(len(self.lengths)))
        key, size = self.lengths.__getitem__, self.batch_size
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            rng.shuffle(idx)
            span = size * self.window
            windows = [sorted(idx[start: start + span], key=key) for start in range(0, len(idx), span)]
        else:
            windows = [sorted(idx, key=key, reverse=True)]  # longest first: a memory problem shows at once
        out = [w[i: i + size] for w in windows for i in range(0, len(w), size)]
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self):  # as a DataLoader's batch_sampler: the first epoch's order (train() asks per epoch)
        return iter(self.batches(0))

    def __len__(self):
        return -(-len(self.lengths) // self.batch_size)


def make_loader(dataset: QADataset, batch_size: int, max_length: int, *, shuffle: bool, seed: int = 0,
                mask_prompt: bool = False) -> DataLoader:
    """A DataLoader of length-grouped, collated batches."""
    sampler = LengthGroupedBatches(dataset.lengths, batch_size, seed=seed, shuffle=shuffle)
    return DataLoader(dataset, batch_sampler=sampler,
                      collate_fn=partial(collate, max_length=max_length, mask_prompt=mask_prompt))


def sample_examples(dataset: QADataset, n: int, seed: int) -> tuple[QADataset, dict]:
    """A fixed, seeded random sample of `n` examples (all when there are no more), and what metrics.json says
    of it. Drawn from the whole set: its first batches, sorted by length, would hold only the longest."""
    sampled = n < len(dataset)
    rows = sorted(random.Random(seed).sample(range(len(dataset)), n)) if sampled else range(len(dataset))
    subset = QADataset(dataset.frame.iloc[rows], dataset.max_length)
    return subset, {"examples": len(subset), "of": len(dataset), "sampled": sampled, "seed": seed,
                    "mean_tokens": _mean_length(subset), "mean_tokens_of_all": _mean_length(dataset)}


def _mean_length(dataset: QADataset) -> float | None:
    return round(statistics.fmean(dataset.lengths), 1) if dataset.lengths else None


def token_efficiency(lengths, batches) -> float:
    """Real tokens / tokens processed when each batch is padded to its longest row."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return real / padded


def plot_lengths(lengths, max_length: int):
    """Histogram of example lengths in GPT-2 tokens, with MAX_LENGTH marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(lengths, bins=60, color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"MAX_LENGTH = {max_length}")
    over = sum(n > max_length for n in lengths)
    share = over / max(len(lengths), 1)
    ax.set(title=f"{len(lengths)} examples; {over} ({share:.0%}) longer than MAX_LENGTH",
           xlabel="tokens per example (prompt + answer + end-of-text)", ylabel="examples")
    ax.legend()
    fig.tight_layout()
    return fig
