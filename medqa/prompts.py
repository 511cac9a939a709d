"""Alpaca-style prompts: the instruction, an optional input, and where the response begins."""

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def format_prompt(instruction: str, input_text: str = "") -> str:
    """Everything the model sees before its answer; ends where the response begins."""
    prompt = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        prompt += f"\n\n### Input:\n{input_text}"
    return prompt + "\n\n### Response:\n"
