"""A frozen encoder of one modality as plain torch: ``Encoder.encode(inputs) -> np.ndarray (N, dim) float32``.

``ImageEncoder`` resizes, crops and normalises uint8 images before its forward pass; ``TextEncoder``
runs an embedding function over strings. ``uml_ray.encoders.registry`` builds them from a spec.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from uml_ray.encoders.spec import EncoderSpec

if TYPE_CHECKING:  # torch is imported where an encoder is built, not on import
    import torch


class Encoder(ABC):
    """A frozen encoder of one modality: ``encode(inputs)`` → ``(N, dim)`` float32 features.

    Image inputs are ``H x W`` (grayscale) or ``H x W x 3`` uint8 arrays; text inputs are strings.
    """

    def __init__(self, spec: EncoderSpec, modality: str, dim: int, device: str):
        self.spec = spec
        self.modality = modality
        self.dim = dim
        self.device = device

    @abstractmethod
    def encode(self, inputs: list) -> np.ndarray:
        """Features of a batch of inputs, one row each."""


class ImageEncoder(Encoder):
    """Resize (shorter side) + centre-crop to ``image_size``, normalise, run ``forward``."""

    def __init__(self, spec, dim, device, forward: Callable, image_size: int, mean, std):
        super().__init__(spec, "image", dim, device)
        import torch

        self.forward = forward
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, images: list) -> torch.Tensor:
        """A normalised ``(N, 3, S, S)`` float tensor from uint8 arrays (grayscale repeated to 3 channels)."""
        import torch
        from PIL import Image

        size = self.image_size
        pixels = np.empty((len(images), size, size, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            picture = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
            width, height = picture.size
            scale = size / min(width, height)
            resized = picture.resize(
                (max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC
            )
            left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
            pixels[i] = np.asarray(resized.crop((left, top, left + size, top + size)))
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        return (batch - self.mean) / self.std

    def encode(self, inputs: list) -> np.ndarray:
        """Pooled image features, ``(N, dim)`` float32."""
        import torch

        with torch.inference_mode():
            features = self.forward(self.preprocess(inputs).to(self.device))
        return features.float().cpu().numpy()


class TextEncoder(Encoder):
    """Runs ``embed(texts) -> Tensor``; optional L2 normalisation."""

    def __init__(self, spec, dim, device, embed: Callable, normalize: bool):
        super().__init__(spec, "text", dim, device)
        self.embed = embed
        self.normalize = normalize

    def encode(self, inputs: list) -> np.ndarray:
        """Sentence features, ``(N, dim)`` float32."""
        import torch

        with torch.inference_mode():
            features = self.embed([str(t) for t in inputs]).float()
            if self.normalize:
                features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu().numpy()
