"""Helpers for llm.ipynb: fine-tune GPT-2 on MedQuAD disease questions, one module per job (docs/design.md)."""

from medqa.errors import MedQAError

__all__ = ["MedQAError"]
