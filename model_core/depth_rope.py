"""Parameter-free rotary position encoding along depth.

In the 3D blocks the tokens of all slice groups of a volume attend to each other. Their 2D
position embeddings say where a token is within its slice, not which slice it came from; rotary
encoding of the group index on queries and keys makes attention depend on the depth offset
between two tokens, so the model knows slice order. It adds no parameter, so every pretrained
tensor is reused as it is and tokens of one group see each other exactly as in 2D.

The angles are computed on the device of the tensor being rotated, at each call (a few dozen
values): nothing is stored that ``model.to(device)`` would have to move, and ``model.to(dtype)``
cannot round the frequencies to half precision.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def angle_dtype(device: torch.device) -> torch.dtype:
    """float64 for the angles where the device has it (CPU, CUDA), else float32 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class DepthRoPE:
    """Rotates each head's query/key by angles ``depth * theta ** (-2i / head_dim)``."""

    def __init__(self, num_heads: int, head_dim: int, theta: float = 10000.0) -> None:
        if head_dim % 2:
            raise ValueError(f"depth RoPE needs an even head dimension, got {head_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.theta = theta

    def angles(self, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``depth`` (tokens,) -> cos, sin of shape ``(tokens, head_dim)``, on ``depth``'s device."""
        dtype = angle_dtype(depth.device)
        exponents = torch.arange(0, self.head_dim, 2, dtype=dtype, device=depth.device) / self.head_dim
        inv_freq = self.theta ** (-exponents)  # (head_dim / 2,)
        freqs = depth.to(dtype)[:, None] * inv_freq[None, :]
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()

    def apply(self, flat: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """``flat`` ``(n, tokens, heads * head_dim)`` queries or keys; ``depth`` ``(tokens,)``."""
        n, tokens, _ = flat.shape
        cos, sin = self.angles(depth.to(flat.device))
        cos, sin = cos.to(flat.dtype)[None, :, None, :], sin.to(flat.dtype)[None, :, None, :]
        heads = flat.view(n, tokens, self.num_heads, self.head_dim)  # (n, tokens, heads, head_dim)
        rotated = heads * cos + rotate_half(heads) * sin
        return rotated.reshape(n, tokens, self.num_heads * self.head_dim)
