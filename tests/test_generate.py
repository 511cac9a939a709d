"""The answering recipe (medqa/generate.py): prompts never cut, answers given the room the context leaves, one
decoding object, and the CPU kernel choice kept in its own module."""

import ast
import inspect
from pathlib import Path

import pytest
import torch

from medqa import ask, cpu_kernels, export, generate, judge
from medqa.errors import MedQAError
from medqa.generate import Decoding

PACKAGE = Path(generate.__file__).parent


def test_a_prompt_that_fills_the_context_is_refused_not_cut_from_the_left(tiny_model):
    context = tiny_model.config.n_positions
    prompts = [[5, 6, 7], torch.randint(0, 50000, (context + 300,)).tolist()]
    with pytest.raises(MedQAError, match=rf"1 prompt\(s\) \(number 2\) have {context + 300} tokens.*reads "
                                         rf"{context} tokens in all.*Shorten"):
        generate.generate_ids(tiny_model, prompts, Decoding(8))
    with pytest.raises(MedQAError, match="no room is left for an answer"):
        generate.generate_ids(tiny_model, [[5] * context], Decoding(8))


def test_answers_shortened_by_a_long_prompt_are_announced(tiny_model):
    """The notebook's own answers: a test prompt longer than the context minus MAX_NEW_TOKENS gets less room."""
    context, lines = tiny_model.config.n_positions, []
    prompts = [[5, 6, 7], torch.randint(0, 50000, (context - 4,)).tolist()]
    out = generate.generate_ids(tiny_model, prompts, Decoding(30), log=lines.append)
    assert len(out[1]) <= 4 and lines == [
        f"note: 1 of 2 prompts leave less than 30 new tokens in the model's context of {context} tokens: their "
        f"answers can have 4 to 4 tokens."]
    lines.clear()
    generate.generate_ids(tiny_model, [[5, 6, 7]], Decoding(30), log=lines.append)
    assert lines == []


def test_the_saved_generation_config_decodes_as_generate_does():
    for decoding in (Decoding(24, 0.0, 1.1), Decoding(99, 0.7, 1.3, batch_size=2, seed=5)):
        saved = export.generation_config(decoding)
        assert saved.max_new_tokens == decoding.max_new_tokens
        assert {k: getattr(saved, k) for k in decoding.config_options()} == decoding.config_options()
        assert saved.repetition_penalty in (None, 1.0)  # generate's own penalty would count the prompt


def by_hand(model, prompt: list[int], max_new_tokens: int, penalty: float) -> list[int]:
    """Greedy decoding one token at a time, the penalty on the tokens of the answer so far only."""
    answer: list[int] = []
    while len(answer) < max_new_tokens:
        logits = model(torch.tensor([prompt + answer])).logits[0, -1]
        said = torch.tensor(sorted(set(answer)), dtype=torch.long)
        logits[said] = torch.where(logits[said] < 0, logits[said] * penalty, logits[said] / penalty)
        answer.append(int(logits.argmax()))
        if answer[-1] == 50256:
            return answer
    return answer


@torch.no_grad()
def test_the_repetition_penalty_counts_the_answer_never_the_prompt(tiny_model):
    """A MedQuAD answer repeats its question's disease name: a token of the prompt is not held back."""
    favourite = generate.generate_ids(tiny_model, [[5, 6, 7]], Decoding(1))[0][0]
    prompts = [[5, 6, 7, favourite], [favourite, 9, 10, 11, 12, 13, 5, 6, 7]]  # the two pad differently
    decoding = Decoding(12, repetition_penalty=1.5, batch_size=2)
    answers = generate.generate_ids(tiny_model, prompts, decoding)
    assert answers == [by_hand(tiny_model, p, 12, 1.5) for p in prompts]
    first = [a[0] for a in generate.generate_ids(tiny_model, prompts, Decoding(1))]
    assert [a[0] for a in answers] == first and any(t in p for t, p in zip(first, prompts))


def _functions(module):
    tree = ast.parse(inspect.getsource(module))
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_generate_reads_as_the_recipe_and_the_kernel_choice_lives_apart():
    recipe = inspect.getsource(generate)
    for machinery in ("torch.ops", "mkldnn", "perf_counter", "FORCED", "_CHOSEN", "Conv1D"):
        assert machinery not in recipe, machinery
    assert "SimpleNamespace" not in inspect.getsource(ask)
    for name in dir(cpu_kernels):  # "path" means a file path in this project, never a kernel choice
        assert "path" not in name.lower(), name
    for module in (generate, cpu_kernels, ask, export, judge):
        long = [f.name for f in _functions(module) if f.end_lineno - f.lineno + 1 > 60 and f.name != "model_card"]
        assert long == [], (module.__name__, long)  # model_card is the card's text, one f-string
        others = set()  # lines another module's owner rewrites: their model-folder check, their settings list
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if getattr(node, "name", None) == "check_model_folder" or (
                    isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CARD_SETTINGS"):
                others |= set(range(node.lineno, node.end_lineno + 1))
        wide = [n for n, line in enumerate(inspect.getsource(module).splitlines(), 1)
                if len(line) > 110 and n not in others]
        assert wide == [], (module.__name__, wide)
