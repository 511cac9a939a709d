"""Helpers for llm.ipynb, which fine-tunes GPT-2 on MedQuAD: one module per job (docs/design.md)."""

from medqa.errors import MedQAError

__all__ = ["MedQAError"]
