"""The greedy loop the notebook shows (medqa/greedy.py) makes the tokens `model.generate` makes, and stops
where it stops."""

import torch

from medqa import generate
from medqa.batches import EOT
from medqa.greedy import greedy_tokens


def generated(model, prompt, max_new_tokens, eos=EOT):
    """model.generate's greedy answer to one prompt, cut before its first `eos`."""
    ids = torch.tensor([prompt])
    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, repetition_penalty=1.0, eos_token_id=eos, pad_token_id=EOT)
    row = new[0, ids.shape[1]:].tolist()
    return row[: row.index(eos)] if eos in row else row


def test_the_greedy_loop_makes_the_tokens_model_generate_makes(tiny_model):
    torch.manual_seed(0)
    for length in (1, 7, 40):
        prompt = torch.randint(0, 50000, (length,)).tolist()
        assert list(greedy_tokens(tiny_model, prompt, 24)) == generated(tiny_model, prompt, 24)


def test_the_greedy_loop_stops_before_the_end_token_as_generate_does(tiny_model):
    prompt = [464, 3290, 318, 257]
    free = list(greedy_tokens(tiny_model, prompt, 12, eos=-1))  # -1: no token ends it
    stop = free[3]
    cut = list(greedy_tokens(tiny_model, prompt, 12, eos=stop))
    assert cut == free[: free.index(stop)] == generated(tiny_model, prompt, 12, eos=stop)
    assert len(cut) < 12


def test_the_greedy_loop_equals_the_batched_answers_the_notebook_uses(tiny_model):
    """generate.generate_ids, plain greedy: the prompts batched, left-padded, sorted by length."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50000, (n,)).tolist() for n in (3, 11, 6)]
    batched = generate.generate_ids(tiny_model, prompts, generate.Decoding(16, batch_size=3))
    assert batched == [list(greedy_tokens(tiny_model, p, 16)) for p in prompts]


def test_the_greedy_loop_leaves_the_model_training_if_it_was(tiny_model):
    tiny_model.train()
    try:
        assert len(list(greedy_tokens(tiny_model, [1, 2, 3], 4, eos=-1))) == 4
        assert tiny_model.training
    finally:
        tiny_model.eval()
