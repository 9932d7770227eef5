"""Data: text corpora, tokenization, deterministic train/validation blocks and batches."""

from phalanx.data.corpus import DataConfig, TokenData, build_data, load_documents

__all__ = ["DataConfig", "TokenData", "build_data", "load_documents"]
