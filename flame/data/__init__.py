"""Data: sources (hub streaming, local files, the embedded default corpus), tokenizers, document
packing with boundaries, weighted mixtures and resumable loading."""

from flame.data.config import DataConfig, SourceConfig
from flame.data.loader import build_dataloader
from flame.data.tokenizer import build_tokenizer

__all__ = ["DataConfig", "SourceConfig", "build_dataloader", "build_tokenizer"]
