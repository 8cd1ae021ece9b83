"""Each batched op against torchvision's per-image functional for the same parameters, and the
pipelines drawing different parameters for each sample.

Tolerances: integer shifts and flips are exact (1e-6); rotation with nearest sampling may pick
the neighbouring pixel where a source point lands on a pixel boundary, so at most 1 % of values
differ; perspective and the colour ops agree within 1e-4 (float rounding only)."""

import augment_reference as A
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

torch.manual_seed(0)
IMAGES = torch.rand(6, 3, 32, 32)


def _per_image(fn):
    return torch.stack([fn(i, img) for i, img in enumerate(IMAGES)])


def test_flip_matches_torchvision():
    flip = torch.tensor([True, False, True, True, False, False])
    ours = A.warp(IMAGES, A.flip_matrix(flip), mode="nearest")
    ref = _per_image(lambda i, im: TF.horizontal_flip(im) if flip[i] else im)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_padded_crop_matches_torchvision():
    top = torch.tensor([0.0, 8, 3, 4, 1, 7])
    left = torch.tensor([8.0, 0, 5, 4, 2, 6])
    ours = A.warp(IMAGES, A.crop_matrix(top, left, 4), mode="nearest")
    ref = _per_image(lambda i, im: TF.crop(TF.pad(im, [4]), int(top[i]), int(left[i]), 32, 32))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_translation_matches_torchvision_affine():
    dx = torch.tensor([3.0, -2, 0, 1, -3, 2])
    dy = torch.tensor([-1.0, 3, 2, 0, -3, 1])
    ours = A.warp(IMAGES, A.translation_matrix(dx, dy), mode="nearest")
    ref = _per_image(lambda i, im: TF.affine(im, angle=0.0, translate=[int(dx[i]), int(dy[i])],
                                             scale=1.0, shear=[0.0, 0.0]))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_rotation_matches_torchvision():
    angles = torch.tensor([-15.0, -7.5, 0.0, 3.3, 11.0, 15.0])
    ours = A.warp(IMAGES, A.rotation_matrix(angles), mode="nearest")
    ref = _per_image(lambda i, im: TF.rotate(im, float(angles[i]),
                                             interpolation=InterpolationMode.NEAREST))
    mismatch = ((ours - ref).abs() > 1e-6).float().mean().item()
    assert mismatch < 0.01
    bilinear = A.warp(IMAGES, A.rotation_matrix(angles))
    ref_bl = _per_image(lambda i, im: TF.rotate(im, float(angles[i]),
                                                interpolation=InterpolationMode.BILINEAR))
    torch.testing.assert_close(bilinear, ref_bl, atol=1e-4, rtol=0)


def test_perspective_matches_torchvision():
    gen = torch.Generator().manual_seed(3)
    end = A.perspective_endpoints(torch.rand(6, 8, generator=gen), 32, 0.2)
    start = A.perspective_startpoints(6, 32, "cpu")
    assert end.min() >= 0 and end.max() <= 31 and torch.equal(end, end.round())
    assert not torch.equal(end[0], end[1])
    ours = A.warp(IMAGES, A.perspective_matrix(start, end, 32))
    ref = _per_image(lambda i, im: TF.perspective(im, start[i].int().tolist(), end[i].int().tolist()))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_composed_geometry_equals_sequential_application():
    angles = torch.tensor([10.0, -5, 3, 0, 14, -14])
    top = torch.tensor([2.0, 4, 6, 0, 8, 1])
    left = torch.tensor([4.0, 4, 1, 7, 0, 3])
    fused = A.warp(IMAGES, [A.rotation_matrix(angles), A.crop_matrix(top, left, 4)])
    rotated = A.warp(IMAGES, A.rotation_matrix(angles))
    sequential = A.warp(rotated, A.crop_matrix(top, left, 4))
    torch.testing.assert_close(fused, sequential, atol=1e-4, rtol=0)


@pytest.mark.parametrize("ours, theirs, factors", [
    (A.adjust_brightness, TF.adjust_brightness, [0.7, 1.0, 1.3, 0.8, 1.2, 0.95]),
    (A.adjust_contrast, TF.adjust_contrast, [0.7, 1.0, 1.3, 0.8, 1.2, 0.95]),
    (A.adjust_saturation, TF.adjust_saturation, [0.7, 1.0, 1.3, 0.8, 1.2, 0.95]),
    (A.adjust_hue, TF.adjust_hue, [-0.2, -0.05, 0.0, 0.1, 0.2, 0.15]),
])
def test_colour_ops_match_torchvision(ours, theirs, factors):
    f = torch.tensor(factors)
    ref = _per_image(lambda i, im: theirs(im, float(f[i])))
    torch.testing.assert_close(ours(IMAGES, f), ref, atol=1e-4, rtol=0)


def test_colour_jitter_applies_each_samples_own_order():
    factors = torch.tensor([[1.2, 0.8, 1.3, 0.1]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    out = A.colour_jitter(IMAGES[:2], factors, order)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(2):
        ref = IMAGES[i]
        for k in order[i].tolist():
            ref = fns[k](ref, float(factors[i, k]))
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["flip-crop", "adamw", "sgdm", "final"])
def test_presets_draw_parameters_per_sample(preset):
    aug = A.Augment(preset)
    same = (IMAGES[:1] * 255).to(torch.uint8).expand(16, -1, -1, -1).contiguous()
    u = aug.draw(16, torch.Generator().manual_seed(0))
    assert u.shape == (16, aug.width)  # every random number of the batch in one draw
    out = aug.apply(same, u)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    distinct = {tuple(o.flatten()[:2000].tolist()) for o in out}
    assert len(distinct) > 8  # torchvision v2 on a batch would give one
    assert out.min() >= -1 - 1e-6 and out.max() <= 1 + 1e-6
    m = aug.geometry(u, 32)[0]
    assert len({tuple(x.flatten().tolist()) for x in m}) > 8


def test_none_preset_only_normalises():
    x = (IMAGES * 255).to(torch.uint8)
    out = A.Augment("none")(x, torch.Generator())
    torch.testing.assert_close(out, (x.float() / 255 - 0.5) / 0.5)


def test_hue_without_host_sync_matches_the_subset_path():
    """Accelerators run hue once on every row between the blends before and after it (no
    nonzero); the same numbers, bit for bit, as the CPU path's hue on each round's rows."""
    gen = torch.Generator().manual_seed(1)
    factors = torch.rand(64, 4, generator=gen) * 0.4 + 0.8
    factors[:, 3] -= 1.0
    order = torch.argsort(torch.rand(64, 4, generator=gen), dim=1)
    assert {int(r) for r in (order == 3).int().argmax(1)} == {0, 1, 2, 3}  # hue in every round
    images = IMAGES.repeat(11, 1, 1, 1)[:64]

    subset = A.colour_jitter(images.clone(), factors, order)
    once = A.colour_jitter(images.clone(), factors, order, sync_free=True)
    assert torch.equal(once, subset)
