"""Datasets and readers.

Importing this package is cheap: it imports neither torch nor transformers (the text tokenizer
is loaded lazily, on first use).
"""

from __future__ import annotations

from onnxopt.data.digits import load_digits_split
from onnxopt.data.text import SENTENCES, tokenize

__all__ = ["load_digits_split", "SENTENCES", "tokenize"]
