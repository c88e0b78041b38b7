"""Dynamic int8 quantisation of the language model, for CPU inference.

Decoding one token reads every weight of the language model once: on a CPU its speed is bound by
memory bandwidth, so int8 weights (a quarter of float32's bytes) can decode faster. torch's dynamic
quantisation stores each ``nn.Linear`` weight as int8 with a scale per output channel and
quantises activations on the fly; embeddings, norms, the vision tower and the projector keep
their precision. CPU only (torch's quantised kernels have no CUDA path).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

INT8 = "int8"
"""The precision name the CLI, batch and panel use for this."""


def quantize_language_model(model: nn.Module) -> nn.Module:
    """Quantise ``model.language_model``'s linear layers to dynamic int8 in place; returns ``model``."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"int8 runs on the CPU only; the model is on {device}: load it with device='cpu'")
    if model.language_model.dtype != torch.float32:
        raise ValueError("int8 quantises float32 weights: load the model in float32 first")
    with warnings.catch_warnings():  # torch marks the API as moving to torchao; it works as documented
        warnings.simplefilter("ignore")
        quantize_dynamic(
            model.language_model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    return model
