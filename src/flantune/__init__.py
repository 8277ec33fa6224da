"""flantune: fine-tune encoder-decoder language models on text-to-text tasks."""

__version__ = "0.1.0"
