"""Example PyTorch models for ``training.model.kind: torch`` (and ``p2pfl harness --model
torch:cnn`` / ``torch:mlp``).

A factory is called as ``factory(inputs=, outputs=, **options)`` with torch's generator
already seeded from the shared seed; it returns an ``nn.Module`` mapping a float32 batch of
shape ``(n, inputs)`` to ``(n, outputs)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

__all__ = ["cnn", "mlp"]


def cnn(
    *,
    inputs: int,
    outputs: int,
    channels: Sequence[int] = (8, 16),
    hidden: int = 64,
    image: Sequence[int] | None = None,
) -> nn.Module:
    """A small CNN for square grey images: per entry of ``channels`` a 3x3 convolution
    (padding 1), ReLU and 2x2 max-pooling, then a ReLU dense layer of ``hidden`` units and
    the output layer. ``image`` is ``[channels, height, width]``; by default a square
    single-channel image of ``inputs`` pixels (digits 8x8: 64, Fashion-MNIST 28x28: 784).
    """
    if image is None:
        side = math.isqrt(inputs)
        if side * side != inputs:
            raise ValueError(f"inputs={inputs} is not a square image; give image=[c, h, w]")
        shape = (1, side, side)
    else:
        if len(image) != 3 or math.prod(image) != inputs:
            raise ValueError(f"image {list(image)} does not hold inputs={inputs} values")
        shape = (int(image[0]), int(image[1]), int(image[2]))
    if not channels:
        raise ValueError("channels must list at least one convolution width")
    layers: list[nn.Module] = [nn.Unflatten(1, shape)]
    depth, height, width = shape
    for width_out in channels:
        if height < 2 or width < 2:
            raise ValueError(f"image {list(shape)} is too small for {len(channels)} poolings")
        layers += [
            nn.Conv2d(depth, int(width_out), kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        depth, height, width = int(width_out), height // 2, width // 2
    layers += [
        nn.Flatten(),
        nn.Linear(depth * height * width, hidden),
        nn.ReLU(),
        nn.Linear(hidden, outputs),
    ]
    return nn.Sequential(*layers)


def mlp(*, inputs: int, outputs: int, hidden: Sequence[int] = (64,)) -> nn.Module:
    """Dense ReLU layers of the ``hidden`` widths, then a linear output layer."""
    layers: list[nn.Module] = []
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)
