"""Helpers for llm.ipynb: fine-tune GPT-2 on MedQuAD disease questions, one module per notebook step."""

from medqa.errors import MedQAError

__all__ = ["MedQAError"]
