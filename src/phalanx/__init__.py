"""phalanx: robust and private decentralized training of large language models."""

__version__ = "0.1.0"
