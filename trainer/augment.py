"""Batched per-sample augmentation on the device: the notes' torchvision pipelines, re-expressed.

torchvision's v2 transforms draw ONE set of random parameters per call, so applied to a batch
tensor every image gets the same crop and the same jitter. Here every parameter is drawn per
sample. Geometry (flip, rotation, padded crop, translation, perspective) is composed into one
3x3 matrix per sample and applied with a single `grid_sample`; colour jitter follows
torchvision's functional definitions with per-sample factors and a per-sample op order.

Coordinates follow torchvision's tensor kernels: a matrix maps an OUTPUT pixel, in coordinates
centred on the image, to the INPUT pixel it samples; `grid_sample` uses align_corners=False.
Composition: applying op A then op B samples the input at  M_A @ M_B @ p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

MEAN = STD = 0.5  # the notes normalise with (0.5, 0.5, 0.5) / (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Preset:
    flip: bool = False
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    crop_padding: int = 0  # RandomCrop(32, padding)
    translate: float = 0.0  # RandomAffine(translate=(t, t)), fraction of the size
    perspective: float = 0.0  # RandomPerspective distortion_scale
    perspective_p: float = 0.5
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue

    @property
    def geometric(self) -> bool:
        return bool(self.flip or self.rotation or self.crop_padding or self.translate
                    or self.perspective)


PRESETS: dict[str, Preset] = {
    "none": Preset(),
    "flip-crop": Preset(flip=True, crop_padding=4),
    "adamw": Preset(flip=True, crop_padding=4, jitter=(0.2, 0.2, 0.2, 0.1)),
    "sgdm": Preset(flip=True, rotation=15, crop_padding=4, translate=0.1, perspective=0.2,
                   jitter=(0.3, 0.3, 0.3, 0.2)),
    "final": Preset(flip=True, rotation=15, crop_padding=4, perspective=0.2,
                    jitter=(0.3, 0.3, 0.3, 0.2)),
}


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _randint(n: int, low: int, high: int, gen: torch.Generator, device) -> torch.Tensor:
    """Integers in [low, high), as floats."""
    return torch.randint(low, high, (n,), generator=gen, device=device).float()


def _eye(n: int, device) -> torch.Tensor:
    return torch.eye(3, device=device).expand(n, 3, 3).clone()


# --- geometry: each returns (B, 3, 3) matrices, output-centred -> input-centred coordinates ---

def flip_matrix(flip: torch.Tensor) -> torch.Tensor:
    """`flip` is a bool per sample (RandomHorizontalFlip)."""
    m = _eye(len(flip), flip.device)
    m[:, 0, 0] = 1 - 2 * flip.float()
    return m


def rotation_matrix(degrees: torch.Tensor) -> torch.Tensor:
    """TF.rotate(img, angle): counter-clockwise by `angle` degrees about the centre."""
    rad = torch.deg2rad(degrees)
    cos, sin = torch.cos(rad), torch.sin(rad)
    m = _eye(len(degrees), degrees.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    return m


def translation_matrix(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Moves content by (dx, dy) pixels (TF.affine translate); output p samples input p - d."""
    m = _eye(len(dx), dx.device)
    m[:, 0, 2], m[:, 1, 2] = -dx, -dy
    return m


def crop_matrix(top: torch.Tensor, left: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by `padding`, then crop the original size at (top, left) of the padded image."""
    return translation_matrix(padding - left, padding - top)


def perspective_matrix(startpoints: torch.Tensor, endpoints: torch.Tensor, size: int) -> torch.Tensor:
    """TF.perspective(img, startpoints, endpoints) for (B, 4, 2) corner lists.

    Solves torchvision's 8-coefficient system per sample (endpoints -> startpoints, in its
    pixel-edge frame where a pixel centre sits at i + 0.5) and moves it into centred coordinates.
    """
    n = len(startpoints)
    e, s = endpoints.double(), startpoints.double()
    a = torch.zeros(n, 8, 8, dtype=torch.float64, device=e.device)
    ex, ey, sx, sy = e[..., 0], e[..., 1], s[..., 0], s[..., 1]
    one = torch.ones_like(ex)
    a[:, 0::2, 0], a[:, 0::2, 1], a[:, 0::2, 2] = ex, ey, one
    a[:, 0::2, 6], a[:, 0::2, 7] = -sx * ex, -sx * ey
    a[:, 1::2, 3], a[:, 1::2, 4], a[:, 1::2, 5] = ex, ey, one
    a[:, 1::2, 6], a[:, 1::2, 7] = -sy * ex, -sy * ey
    b = s.reshape(n, 8)
    c = torch.linalg.solve(a, b).float()
    h = torch.cat([c, torch.ones(n, 1, device=c.device)], dim=1).reshape(n, 3, 3)
    half = size / 2
    to_edge = _eye(n, c.device)
    to_edge[:, :2, 2] = half
    to_centre = _eye(n, c.device)
    to_centre[:, :2, 2] = -half
    return to_centre @ h @ to_edge


def random_perspective_points(n: int, size: int, distortion: float, gen, device):
    """RandomPerspective.get_params per sample: (startpoints, endpoints), each (n, 4, 2)."""
    half = size // 2
    bound = int(distortion * half) + 1
    lo = lambda: _randint(n, 0, bound, gen, device)  # noqa: E731
    hi = lambda: _randint(n, size - bound, size, gen, device)  # noqa: E731
    end = torch.stack([torch.stack([lo(), lo()], 1), torch.stack([hi(), lo()], 1),
                       torch.stack([hi(), hi()], 1), torch.stack([lo(), hi()], 1)], dim=1)
    start = torch.tensor([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]],
                         dtype=torch.float32, device=device).expand(n, 4, 2)
    return start, end


def _merge_exact(stages: list[torch.Tensor]) -> list[torch.Tensor]:
    """Folds a leading flip into the next stage: a flip maps the frame onto itself, so its
    intermediate image needs no bounds check (one matrix product fewer per pixel)."""
    if len(stages) > 1:
        stages = [stages[0] @ stages[1], *stages[2:]]
    return stages


def warp(images: torch.Tensor, stages: torch.Tensor | list[torch.Tensor],
         mode: str = "bilinear") -> torch.Tensor:
    """Samples each image through its matrices, zeros outside.

    `stages` is one (B, 3, 3) matrix or a list of them in the order the ops apply. One
    `grid_sample` reads the input through their product; a point that some intermediate stage
    would have taken from outside its image is zeroed, as the op-by-op pipeline's fill does."""
    stages = [stages] if isinstance(stages, torch.Tensor) else stages
    n, _, h, w = images.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=images.device, dtype=torch.float32) - (h - 1) / 2,
        torch.arange(w, device=images.device, dtype=torch.float32) - (w - 1) / 2,
        indexing="ij",
    )
    # coordinates as (n, h*w) planes: a 3x3 product by hand beats a K=3 batched matmul
    x, y = xs.reshape(1, -1), ys.reshape(1, -1)
    inside = None
    for i, m in enumerate(reversed(stages)):
        c = [m[:, r, k, None] for r in range(3) for k in range(3)]
        denom = c[6] * x + c[7] * y + c[8]
        x, y = (c[0] * x + c[1] * y + c[2]) / denom, (c[3] * x + c[4] * y + c[5]) / denom
        if i < len(stages) - 1:  # an intermediate image: outside it there was only fill
            ok = (x.abs() <= w / 2) & (y.abs() <= h / 2)
            inside = ok if inside is None else inside & ok
    grid = torch.stack([x / (w / 2), y / (h / 2)], dim=-1).reshape(n, h, w, 2).to(images.dtype)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if inside is not None:
        out = out * inside.reshape(n, 1, h, w).to(out.dtype)
    return out


# --- colour: torchvision's definitions with one factor per sample ---

def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = TF.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, TF.rgb_to_grayscale(x), factor)




def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's RGB -> HSV, h += shift, HSV -> RGB, in fewer passes: value and saturation
    are unchanged by a hue shift, so each channel is max - range * clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6h) mod 6, n = 5, 3, 1 for r, g, b (the standard closed form)."""
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    span = maxc - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(span == 0, 1.0, span)
    h6 = torch.where(maxc == r, (g - b) / safe,
                     torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h6 += 6 * shift.view(-1, 1, 1)
    k = torch.stack([h6 + 5, h6 + 3, h6 + 1], dim=-3).remainder_(6.0)
    weight = torch.minimum(k, 4 - k).clamp_(0, 1)
    return maxc.unsqueeze(-3) - span.unsqueeze(-3) * weight


def colour_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`factors` (B, 4): brightness, contrast, saturation, hue shift; `order` (B, 4) a permutation
    per sample, as ColorJitter draws one. Round r applies op order[:, r] to each sample.

    Brightness, contrast and saturation are all clamp(f*x + (1-f)*G) with G = 0, the image's
    mean grey, or the pixel's grey: one fused blend per round covers the three, with f = 1
    (identity) for samples whose op this round is hue; hue runs on just its samples."""
    n = len(x)
    rows = torch.arange(n, device=x.device)
    for r in range(4):
        op = order[:, r]
        f = torch.where(op == 3, 1.0, factors[rows, op.clamp(max=2)]).view(n, 1, 1, 1)
        grey = TF.rgb_to_grayscale(x)
        mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
        target = torch.where((op == 1).view(n, 1, 1, 1), mean,
                             torch.where((op == 2).view(n, 1, 1, 1), grey, 0.0))
        x = (f * x + (1 - f) * target).clamp_(0, 1)
        hue_rows = (op == 3).nonzero().squeeze(1)
        if len(hue_rows):
            x[hue_rows] = adjust_hue(x[hue_rows], factors[hue_rows, 3])
    return x


class Augment:
    """Callable turning a uint8 (B, 3, H, W) batch into a normalised float batch, with random
    parameters drawn per sample from `generator` (on the images' device)."""

    def __init__(self, preset: str | Preset, generator: torch.Generator):
        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        self.gen = generator

    def sample_geometry(self, n: int, size: int, device) -> list[torch.Tensor]:
        """Per-sample matrices of the preset's geometric ops, in the order they apply."""
        p, g = self.preset, self.gen
        stages = []
        if p.flip:
            stages.append(flip_matrix(torch.rand(n, generator=g, device=device) < 0.5))
        if p.rotation:
            stages.append(rotation_matrix(_uniform(n, -p.rotation, p.rotation, g, device)))
        if p.crop_padding:
            span = 2 * p.crop_padding + 1
            top, left = _randint(n, 0, span, g, device), _randint(n, 0, span, g, device)
            stages.append(crop_matrix(top, left, p.crop_padding))
        if p.translate:
            limit = p.translate * size
            dx = torch.round(_uniform(n, -limit, limit, g, device))
            dy = torch.round(_uniform(n, -limit, limit, g, device))
            stages.append(translation_matrix(dx, dy))
        if p.perspective:
            start, end = random_perspective_points(n, size, p.perspective, g, device)
            persp = perspective_matrix(start, end, size)
            apply = torch.rand(n, generator=g, device=device) < p.perspective_p
            stages.append(torch.where(apply.view(-1, 1, 1), persp, _eye(n, device)))
        return _merge_exact(stages)

    def sample_colour(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, s, h = self.preset.jitter
        g = self.gen
        factors = torch.stack([
            _uniform(n, max(0.0, 1 - b), 1 + b, g, device),
            _uniform(n, max(0.0, 1 - c), 1 + c, g, device),
            _uniform(n, max(0.0, 1 - s), 1 + s, g, device),
            _uniform(n, -h, h, g, device),
        ], dim=1)
        order = torch.argsort(torch.rand(n, 4, generator=g, device=device), dim=1)
        return factors, order

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255)
        n, size = x.shape[0], x.shape[-1]
        if self.preset.geometric:
            x = warp(x, self.sample_geometry(n, size, x.device))
        if self.preset.jitter:
            x = colour_jitter(x, *self.sample_colour(n, x.device))
        return normalize(x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def prepare_eval(images: torch.Tensor) -> torch.Tensor:
    """Evaluation transform: ToTensor + Normalize, as in the notes."""
    return normalize(images.float().div_(255))


__all__ = ["PRESETS", "Augment", "Preset", "prepare_eval", "warp"]
