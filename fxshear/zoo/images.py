"""A real image set needing no download: scikit-learn's handwritten digits, upscaled.

Why this set: the vision path (ViT token dropping) should be checked on real images, and the only
ones a machine without a dataset hub has are those its packages ship; scikit-learn ships 1,797
8x8 grey-level digits.  Upscaled (bilinear) to ``image_size`` and repeated over three channels,
they fit a Hugging Face ViT config with patches of ``image_size // 8`` pixels.  ``scikit-learn``
is the ``bench`` extra (``pip install -e '.[bench]'``), not a dependency of fxshear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["load_digits"]


def load_digits(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [1797, 3, image_size, image_size] float32, labels [1797] int64)``, the images
    normalised to mean 0 and standard deviation 1 over the whole set; identical on every call."""
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError("fxshear.zoo.images.load_digits needs scikit-learn, which ships the digits: "
                          "pip install -e '.[bench]' (or pip install scikit-learn)") from error
    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    return images.expand(-1, 3, -1, -1).contiguous(), torch.tensor(data.target, dtype=torch.long)
