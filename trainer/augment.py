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
    c = torch.linalg.solve_ex(a, b)[0].float()  # solve_ex: no host sync for an error check
    h = torch.cat([c, torch.ones(n, 1, device=c.device)], dim=1).reshape(n, 3, 3)
    half = size / 2
    to_edge = _eye(n, c.device)
    to_edge[:, :2, 2] = half
    to_centre = _eye(n, c.device)
    to_centre[:, :2, 2] = -half
    return to_centre @ h @ to_edge


def perspective_endpoints(u: torch.Tensor, size: int, distortion: float) -> torch.Tensor:
    """RandomPerspective.get_params per sample from 8 uniforms each: (n, 4, 2) end corners."""
    half = size // 2
    bound = int(distortion * half) + 1
    lo = torch.floor(u * bound)  # randint(0, bound)
    hi = size - bound + lo  # randint(size - bound, size)
    pick = [(lo, lo), (hi, lo), (hi, hi), (lo, hi)]
    return torch.stack([torch.stack([a[:, 2 * i], b[:, 2 * i + 1]], 1)
                        for i, (a, b) in enumerate(pick)], dim=1)


_CORNERS: dict[tuple[int, str], torch.Tensor] = {}


def perspective_startpoints(n: int, size: int, device) -> torch.Tensor:
    """The image's corners (n, 4, 2); kept per device, so steps copy nothing to the device."""
    key = (size, str(device))
    if key not in _CORNERS:
        _CORNERS[key] = torch.tensor([[0, 0], [size - 1, 0], [size - 1, size - 1], [0, size - 1]],
                                     dtype=torch.float32, device=device)
    return _CORNERS[key].expand(n, 4, 2)


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


def colour_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                  sync_free: bool | None = None) -> torch.Tensor:
    """`factors` (B, 4): brightness, contrast, saturation, hue shift; `order` (B, 4) a permutation
    per sample, as ColorJitter draws one. Round r applies op order[:, r] to each sample.

    Brightness, contrast and saturation are all clamp(f*x + (1-f)*G) with G = 0, the image's
    mean grey, or the pixel's grey: one fused blend per round covers the three, with f = 1
    (identity) for samples whose op this round is hue. On the CPU hue runs on just its samples;
    `sync_free` (default: off the CPU) runs it on all and selects, so no host sync happens."""
    if sync_free is None:
        sync_free = x.device.type != "cpu"
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
        is_hue = op == 3
        if not sync_free:  # the few hue rows only; a host sync costs nothing on the CPU
            hue_rows = is_hue.nonzero().squeeze(1)
            if len(hue_rows):
                x[hue_rows] = adjust_hue(x[hue_rows], factors[hue_rows, 3])
        else:  # accelerators: every row, then select; no data-dependent shape, no sync
            x = torch.where(is_hue.view(n, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)
    return x


class Augment:
    """A preset's augmentation in two parts, so that packed trials share one pass:
    `draw(n, generator)` takes all random numbers of n samples from one trial's generator as an
    (n, width) tensor of uniforms (one kernel); `apply(images, u)` turns a uint8 (B, 3, H, W)
    batch into a normalised float batch using those draws, for any number of trials at once."""

    def __init__(self, preset: str | Preset):
        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        p = self.preset
        widths = {"flip": int(p.flip), "rotation": int(bool(p.rotation)),
                  "crop": 2 * int(bool(p.crop_padding)), "translate": 2 * int(bool(p.translate)),
                  "perspective": 9 * int(bool(p.perspective)), "jitter": 8 * int(bool(p.jitter))}
        self.slices, at = {}, 0
        for name, w in widths.items():
            self.slices[name] = slice(at, at + w)
            at += w
        self.width = at

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(n, self.width, generator=generator, device=generator.device)

    def geometry(self, u: torch.Tensor, size: int) -> list[torch.Tensor]:
        """Per-sample matrices of the preset's geometric ops, in the order they apply."""
        p, n, stages = self.preset, len(u), []
        part = {k: u[:, s] for k, s in self.slices.items()}
        if p.flip:
            stages.append(flip_matrix(part["flip"][:, 0] < 0.5))
        if p.rotation:
            stages.append(rotation_matrix(part["rotation"][:, 0] * (2 * p.rotation) - p.rotation))
        if p.crop_padding:
            top_left = torch.floor(part["crop"] * (2 * p.crop_padding + 1))
            stages.append(crop_matrix(top_left[:, 0], top_left[:, 1], p.crop_padding))
        if p.translate:
            limit = p.translate * size
            d = torch.round(part["translate"] * (2 * limit) - limit)
            stages.append(translation_matrix(d[:, 0], d[:, 1]))
        if p.perspective:
            draws = part["perspective"]
            end = perspective_endpoints(draws[:, :8], size, p.perspective)
            persp = perspective_matrix(perspective_startpoints(n, size, u.device), end, size)
            apply = (draws[:, 8] < p.perspective_p).view(-1, 1, 1)
            stages.append(torch.where(apply, persp, _eye(n, u.device)))
        return _merge_exact(stages)

    def colour(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factors (n, 4): brightness, contrast, saturation, hue shift; order (n, 4))."""
        draws = u[:, self.slices["jitter"]]
        ranges = [(max(0.0, 1 - j), 1 + j) for j in self.preset.jitter[:3]]
        ranges.append((-self.preset.jitter[3], self.preset.jitter[3]))
        factors = torch.stack([draws[:, i] * (hi - lo) + lo for i, (lo, hi) in enumerate(ranges)], 1)
        return factors, torch.argsort(draws[:, 4:], dim=1)

    def apply(self, images: torch.Tensor, u: torch.Tensor, sync_free: bool | None = None
              ) -> torch.Tensor:
        x = images.float().div_(255)
        if self.preset.geometric:
            x = warp(x, self.geometry(u, x.shape[-1]))
        if self.preset.jitter:
            x = colour_jitter(x, *self.colour(u), sync_free=sync_free)
        return normalize(x)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(len(images), generator))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def prepare_eval(images: torch.Tensor) -> torch.Tensor:
    """Evaluation transform: ToTensor + Normalize, as in the notes."""
    return normalize(images.float().div_(255))


__all__ = ["PRESETS", "Augment", "Preset", "prepare_eval", "warp"]
