"""all-MiniLM-L6-v2 as one module: token ids in, L2-normalised sentence embedding out.

sentence-transformers' pipeline for this model is BERT -> mean pooling over real tokens ->
L2 normalisation (see the bundled ``modules.json``); :class:`SentenceEmbedder` restates the last
two steps in torch so the whole thing exports as one ONNX graph (sentence-transformers itself is
not needed).

This module imports torch at import time; :mod:`onnxopt.zoo` imports it (and transformers) lazily.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SentenceEmbedder", "load_minilm"]


class SentenceEmbedder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )[0]  # last_hidden_state: (batch, seq, 384)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1)


def load_minilm(path) -> SentenceEmbedder:
    """Load the encoder from a local folder (offline) and wrap it; eval mode."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # No "Loading weights" progress bar: it is noise in a CLI run. Restore the caller's setting.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # Eager attention, not SDPA: the SDPA graph (IsNaN/Where mask handling) does not fuse into
        # ORT's Attention op, which MiniLM's int8 speed-up depends on (benchmarks/quantize.py).
        # Same numbers; the exported fp32 graph is the classic BERT attention pattern.
        encoder = AutoModel.from_pretrained(str(path), attn_implementation="eager")
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return SentenceEmbedder(encoder).eval()
