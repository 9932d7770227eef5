"""Data: text corpora, tokenization, deterministic train/validation blocks and batches."""

from phalanx.data.corpus import DataConfig, TokenData, load_documents, build_data

__all__ = ["DataConfig", "TokenData", "build_data", "load_documents"]
