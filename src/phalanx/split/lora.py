"""LoRA adapters through ``peft``, on any module that holds Hugging Face decoder layers.

``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` in place by a
``peft.tuners.lora.Linear`` that keeps the original as ``base_layer`` and adds
``scaling * B(A(dropout(x)))``, with B initialised to zero: the adapted module computes exactly
the base module at the start. It works on plain modules (a :class:`StageModule` and its custom
forward), not only on Hugging Face ``PreTrainedModel`` s. The base parameters' names gain a
``base_layer`` level (``...q_proj.weight`` becomes ``...q_proj.base_layer.weight``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from phalanx.errors import ConfigError
from phalanx.split.parts import freeze_base

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def add_lora(
    module: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
    targets: Sequence[str] = ATTENTION_TARGETS,
) -> list[str]:
    """Add LoRA adapters of ``rank`` (scaling ``alpha / rank``) to every linear layer of
    ``module`` whose name ends in one of ``targets``, and freeze every base parameter; returns
    the names of the adapted layers."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    conv = any(isinstance(m, Conv1D) and n.rpartition(".")[2] in targets
               for n, m in module.named_modules())  # GPT-2 stores its weights (in, out)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, fan_in_fan_out=conv,
                     target_modules=list(targets), bias="none")
    try:
        inject_adapter_in_model(cfg, module)
    except ValueError as exc:  # peft's message for targets that match no layer
        raise ConfigError(f"LoRA targets {list(targets)} do not fit the model: {exc}") from None
    freeze_base(module)
    return lora_layers(module)


def lora_layers(module: nn.Module) -> list[str]:
    """Names of the layers of ``module`` that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return [n for n, m in module.named_modules() if isinstance(m, LoraLayer)]
