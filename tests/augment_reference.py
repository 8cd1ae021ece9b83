"""The augmentation's per-op reference forms, for tests only: each op applied alone, as
torchvision applies it, from the product's building blocks (`trainer.augment`), so the tests can
hold every batched op against torchvision's per-image functional. `A.xxx` in the tests is this
module: the product's names plus these."""

import torch

from trainer.augment import *  # noqa: F403
from trainer.augment import (  # noqa: F401
    _blends,
    _constant,
    adjust_hue,
    crop_matrix,
    flip_matrix,
    grey_of,
    jitter_by_plan,
    jitter_plan,
    perspective_endpoints,
    perspective_matrix,
    perspective_startpoints,
    reads_of,
    rotation_matrix,
    translation_matrix,
    warp_reads,
)


def warp(images: torch.Tensor, stages: torch.Tensor | list[torch.Tensor],
         mode: str = "bilinear") -> torch.Tensor:
    """Samples each image through its matrices, zeros outside.

    `stages` is one (B, 3, 3) matrix or a list of them in the order the ops apply. One
    `grid_sample` reads the input through their product; a point that some intermediate stage
    would have taken from outside its image is zeroed, as the op-by-op pipeline's fill does."""
    stages = [stages] if isinstance(stages, torch.Tensor) else stages
    return warp_reads(images, reads_of(stages), mode)



def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grey_of(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grey_of(x), factor)



def colour_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                  sync_free: bool | None = None) -> torch.Tensor:
    """`factors` (B, 4): brightness, contrast, saturation, hue shift; `order` (B, 4) a permutation
    per sample, as ColorJitter draws one. Round r applies op order[:, r] to each sample.

    Brightness, contrast and saturation are all clamp(f*x + (1-f)*G) with G = 0, the image's
    mean grey, or the pixel's grey: one fused blend covers the three, with f = 1 (exactly the
    identity) for a sample whose op it is not; `jitter_plan` takes every coefficient at once.
    On the CPU each of the four rounds blends all samples and hue-shifts just the samples whose
    op it is (a host sync costs nothing there). `sync_free` (default: off the CPU) runs hue ONCE
    on every sample, between the blends before it and the blends after it (three rounds each,
    idle where a sample has none): no data-dependent shape, no sync, and a quarter of the hue
    passes of selecting it in every round. Both give the same numbers (tests/test_augment.py)."""
    if sync_free is None:
        sync_free = x.device.type != "cpu"
    return jitter_by_plan(x, jitter_plan(factors, order, sync_free), sync_free)


