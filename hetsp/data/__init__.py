"""Data: documents from `datasets`, tokenized, cut into global batches by a token budget.

Public entry point: ``build_data(data: DataConfig, seed) -> DataModule``.
"""

from .module import DataModule, build_data, check_data_config
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["DataModule", "build_data", "check_data_config", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]
