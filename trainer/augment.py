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


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(name: str, values: list[float], shape: tuple[int, ...], device,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small constant tensor, made once per device (steps copy nothing to the device)."""
    key = (name, str(device), dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, device=device, dtype=dtype).view(shape)
    return _CONSTANTS[key]


def _eye(n: int, device) -> torch.Tensor:
    return _constant("eye", [1.0, 0, 0, 0, 1, 0, 0, 0, 1], (1, 3, 3), device).expand(n, 3, 3)


# --- geometry: each returns (B, 3, 3) matrices, output-centred -> input-centred coordinates.
# Each is one stack of its entries (one kernel), constants being views of cached tensors. ---

def _affine(n: int, device, *entries: torch.Tensor | float) -> torch.Tensor:
    """(n, 3, 3) matrices [[a, b, c], [d, e, f], [0, 0, 1]] from six (n,) tensors or floats."""
    def column(e):
        if isinstance(e, torch.Tensor):
            return e.float()
        return _constant(f"scalar{float(e)}", [float(e)], (1,), device).expand(n)

    return torch.stack([column(e) for e in (*entries, 0.0, 0.0, 1.0)], 1).view(n, 3, 3)


def flip_matrix(flip: torch.Tensor) -> torch.Tensor:
    """`flip` is a bool per sample (RandomHorizontalFlip)."""
    return _affine(len(flip), flip.device, 1 - 2 * flip.float(), 0.0, 0.0, 0.0, 1.0, 0.0)


def rotation_matrix(degrees: torch.Tensor) -> torch.Tensor:
    """TF.rotate(img, angle): counter-clockwise by `angle` degrees about the centre."""
    rad = torch.deg2rad(degrees)
    cos, sin = torch.cos(rad), torch.sin(rad)
    return _affine(len(degrees), degrees.device, cos, -sin, 0.0, sin, cos, 0.0)


def translation_matrix(dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Moves content by (dx, dy) pixels (TF.affine translate); output p samples input p - d."""
    return _affine(len(dx), dx.device, 1.0, 0.0, -dx, 0.0, 1.0, -dy)


def crop_matrix(top: torch.Tensor, left: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by `padding`, then crop the original size at (top, left) of the padded image."""
    return _affine(len(top), top.device, 1.0, 0.0, left - padding, 0.0, 1.0, top - padding)


def perspective_matrix(startpoints: torch.Tensor, endpoints: torch.Tensor, size: int) -> torch.Tensor:
    """TF.perspective(img, startpoints, endpoints) for (B, 4, 2) corner lists.

    Solves torchvision's 8-coefficient system per sample (endpoints -> startpoints, in its
    pixel-edge frame where a pixel centre sits at i + 0.5) and moves it into centred coordinates.
    """
    n, dev = len(startpoints), endpoints.device
    e, s = endpoints.double(), startpoints.double()
    ex, ey, sx, sy = e[..., 0], e[..., 1], s[..., 0], s[..., 1]
    one = _constant("one64", [1.0], (1, 1), dev, torch.float64).expand(n, 4)
    zero = _constant("zero64", [0.0], (1, 1), dev, torch.float64).expand(n, 4)
    # rows 2i: (ex, ey, 1, 0, 0, 0, -sx ex, -sx ey); rows 2i+1: (0, 0, 0, ex, ey, 1, -sy ex, -sy ey)
    even = torch.stack([ex, ey, one, zero, zero, zero, -sx * ex, -sx * ey], -1)
    odd = torch.stack([zero, zero, zero, ex, ey, one, -sy * ex, -sy * ey], -1)
    a = torch.stack([even, odd], 2).view(n, 8, 8)
    c = torch.linalg.solve_ex(a, s.reshape(n, 8))[0]  # solve_ex: no host sync for an error check
    h = torch.cat([c.float(), _constant("one", [1.0], (1, 1), dev).expand(n, 1)], 1).view(n, 3, 3)
    half = size / 2
    to_centre = _constant(f"to_centre{half}", [1.0, 0, -half, 0, 1, -half, 0, 0, 1], (3, 3), dev)
    to_edge = _constant(f"to_edge{half}", [1.0, 0, half, 0, 1, half, 0, 0, 1], (3, 3), dev)
    return to_centre @ h @ to_edge


def perspective_endpoints(u: torch.Tensor, size: int, distortion: float) -> torch.Tensor:
    """RandomPerspective.get_params per sample from 8 uniforms each: (n, 4, 2) end corners:
    top-left (lo, lo), top-right (hi, lo), bottom-right (hi, hi), bottom-left (lo, hi) with
    lo = randint(0, bound) and hi = randint(size - bound, size) = size - bound + lo."""
    bound = int(distortion * (size // 2)) + 1
    far = float(size - bound)
    offsets = _constant(f"corners{size},{bound}", [0.0, 0, far, 0, far, far, 0, far], (1, 8),
                        u.device)
    return (torch.floor(u * bound) + offsets).view(-1, 4, 2)


def perspective_startpoints(n: int, size: int, device) -> torch.Tensor:
    """The image's corners (n, 4, 2); kept per device, so steps copy nothing to the device."""
    last = float(size - 1)
    return _constant(f"start{size}", [0.0, 0, last, 0, last, last, 0, last], (1, 4, 2),
                     device).expand(n, 4, 2)


def _merge_exact(stages: list[torch.Tensor]) -> list[torch.Tensor]:
    """Folds a leading flip into the next stage: a flip maps the frame onto itself, so its
    intermediate image needs no bounds check (one matrix product fewer per pixel)."""
    if len(stages) > 1:
        stages = [stages[0] @ stages[1], *stages[2:]]
    return stages


def reads_of(stages: list[torch.Tensor]) -> torch.Tensor:
    """(B, S, 3, 3): where each of S stages reads, for an output pixel: the products of the
    last k matrices (projective maps compose as matrices; the last is the whole warp)."""
    reads = [stages[-1]]
    for m in reversed(stages[:-1]):
        reads.append(m @ reads[-1])
    return torch.stack(reads, 1)


def warp_reads(images: torch.Tensor, reads: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """`warp` from its stages' products (`reads_of`), all applied in ONE matmul to the pixel
    grid; the last one samples the image, the others only bound it."""
    n, _, h, w = images.shape
    xy1 = torch.matmul(_pixel_grid(h, w, images.device), reads.transpose(-1, -2))
    xy = xy1[..., :2] / xy1[..., 2:]  # (n, stages, h*w, 2), centred pixel coordinates
    half = _half_size(h, w, images.device)
    grid = (xy[:, -1] / half).reshape(n, h, w, 2).to(images.dtype)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if reads.shape[1] > 1:  # an intermediate image: outside it there was only fill
        inside = (xy[:, :-1].abs() <= half).all(-1).all(1)
        out = out * inside.reshape(n, 1, h, w).to(out.dtype)
    return out


_GRIDS: dict[tuple, torch.Tensor] = {}


def _pixel_grid(h: int, w: int, device) -> torch.Tensor:
    """(h*w, 3) homogeneous centred coordinates (x, y, 1) of the output pixels, per device."""
    key = ("grid", h, w, str(device))
    if key not in _GRIDS:
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) - (h - 1) / 2,
                                torch.arange(w, dtype=torch.float32) - (w - 1) / 2, indexing="ij")
        _GRIDS[key] = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3).to(device)
    return _GRIDS[key]


def _half_size(h: int, w: int, device) -> torch.Tensor:
    key = ("half", h, w, str(device))
    if key not in _GRIDS:
        _GRIDS[key] = torch.tensor([w / 2, h / 2], device=device)
    return _GRIDS[key]


# --- colour: torchvision's definitions with one factor per sample ---

def grey_of(x: torch.Tensor) -> torch.Tensor:
    """TF.rgb_to_grayscale's luma (0.2989 r + 0.587 g + 0.114 b), (B, 1, H, W), in two passes."""
    weights = _constant("luma", [0.2989, 0.587, 0.114], (1, 3, 1, 1), x.device)
    return (x * weights).sum(-3, keepdim=True)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's RGB -> HSV, h += shift, HSV -> RGB, in fewer passes: value and saturation
    are unchanged by a hue shift, so each channel is max - range * clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6h) mod 6, n = 5, 3, 1 for r, g, b (the standard closed form). The hue in
    sixths is (g - b, b - r, r - g)[c] / range + (0, 2, 4)[c] for c the first channel holding
    the max (torchvision's r, then g, then b precedence: arg-max returns the first)."""
    maxc, top = x.max(dim=-3, keepdim=True)
    span = maxc - x.amin(dim=-3, keepdim=True)
    # (g - b, b - r, r - g) / range + (0, 2, 4): each channel's two successors, cyclically.
    # A grey pixel (range 0) has diffs 0 and keeps its value whatever h6 is; the clamp only
    # avoids 0 / 0 (a range under 1e-12 moves a channel by less than that)
    diffs = x.roll(-1, dims=-3) - x.roll(-2, dims=-3)
    sixths = diffs / span.clamp_min(1e-12) + _constant("hue_at", [0.0, 2.0, 4.0], (1, 3, 1, 1), x.device)
    h6 = sixths.gather(-3, top) + 6 * shift.view(-1, 1, 1, 1)
    k = (h6 + _constant("hue_n", [5.0, 3.0, 1.0], (1, 3, 1, 1), x.device)).remainder_(6.0)
    weight = torch.minimum(k, 4 - k).clamp_(0, 1)
    return maxc - span * weight


# The columns of `jitter_plan`'s table. With `sync_free`: blend f, mean and grey weights of the
# three rounds before hue, the same for the three rounds after it, then the hue shift.
SYNC_FREE_COLUMNS = {"f_before": slice(0, 3), "mean_before": slice(3, 6), "grey_before": slice(6, 9),
                     "f_after": slice(9, 12), "mean_after": slice(12, 15),
                     "grey_after": slice(15, 18), "shift": 18}
# Without: f, mean and grey weights of each of the four rounds, which round is hue, the shift.
ROUND_COLUMNS = {"f": 0, "mean": 4, "grey": 8, "hue": 12, "shift": 16}
WARP_COLUMNS = 9  # per warp stage: its 3x3 read matrix, flattened


def jitter_width(sync_free: bool) -> int:
    """Columns of `jitter_plan`'s table."""
    return SYNC_FREE_COLUMNS["shift"] + 1 if sync_free else ROUND_COLUMNS["shift"] + 1


def jitter_plan(factors: torch.Tensor, order: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """Every coefficient `jitter_by_plan` needs, (B, 19) with `sync_free`: blend f, mean and
    grey weights of the three rounds before hue and of the three after it, then the hue shift;
    else (B, 17): f, mean and grey weights of each of the four rounds, hue flags, the shift."""
    is_hue = order == 3  # (n, 4) per round
    blend = torch.where(is_hue, 1.0, factors.gather(1, order.clamp(max=2)))
    uses_mean, uses_grey = (order == 1).to(factors.dtype), (order == 2).to(factors.dtype)
    shift = factors[:, 3:]
    if not sync_free:
        return torch.cat([blend, uses_mean, uses_grey, is_hue.to(factors.dtype), shift], 1)
    hue_round = is_hue.to(torch.uint8).argmax(1, keepdim=True)  # (n, 1)
    rounds = _constant("rounds", [0.0, 1, 2, 3], (1, 4), factors.device)
    # hue is never before round 0 nor after round 3: rounds 0-2 before it, 1-3 after it
    before, after = (rounds < hue_round)[:, :3], (rounds > hue_round)[:, 1:]
    f_before, f_after = torch.where(before, blend[:, :3], 1.0), torch.where(after, blend[:, 1:], 1.0)
    return torch.cat([f_before, uses_mean[:, :3] * before, uses_grey[:, :3] * before,
                      f_after, uses_mean[:, 1:] * after, uses_grey[:, 1:] * after, shift], 1)


def _blends(x: torch.Tensor, f: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rounds of clamp(f*x + (1-f)*(c*mean grey + s*grey)), one per column of (n, rounds) f, c, s."""
    n = len(x)
    for r in range(f.shape[1]):
        grey = grey_of(x)
        mean = grey.mean(dim=(-2, -1), keepdim=True)
        target = torch.addcmul(mean * c[:, r].view(n, 1, 1, 1), grey, s[:, r].view(n, 1, 1, 1))
        x = torch.lerp(target, x, f[:, r].view(n, 1, 1, 1)).clamp_(0, 1)  # f = 1: x exactly
    return x


def jitter_by_plan(x: torch.Tensor, plan: torch.Tensor, sync_free: bool) -> torch.Tensor:
    """Colour jitter from `jitter_plan`'s coefficients."""
    if sync_free:
        c = SYNC_FREE_COLUMNS
        x = _blends(x, plan[:, c["f_before"]], plan[:, c["mean_before"]], plan[:, c["grey_before"]])
        x = adjust_hue(x, plan[:, c["shift"]])
        return _blends(x, plan[:, c["f_after"]], plan[:, c["mean_after"]], plan[:, c["grey_after"]])
    c = ROUND_COLUMNS
    for r in range(4):
        x = _blends(x, plan[:, c["f"] + r:c["f"] + r + 1], plan[:, c["mean"] + r:c["mean"] + r + 1],
                    plan[:, c["grey"] + r:c["grey"] + r + 1])
        hue_rows = plan[:, c["hue"] + r].nonzero().squeeze(1)
        if len(hue_rows):
            x[hue_rows] = adjust_hue(x[hue_rows], plan[hue_rows, c["shift"]])
    return x


class Augment:
    """A preset's augmentation in parts, so that packed trials share one pass:
    `draw(n, generator)` takes all random numbers of n samples from one trial's generator as an
    (n, width) tensor of uniforms (one kernel); `plan(u)` turns them into what they decide per
    sample (matrices, blend coefficients); `apply_plan(images, plan)` turns a uint8
    (B, 3, H, W) batch into a normalised float batch, for any number of trials at once.
    `apply(images, u)` is the last two together."""

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
            stages.append(torch.where(apply, persp, _eye(n, u.device)))  # p = 0.5 per sample
        return _merge_exact(stages) if p.flip else stages

    def colour(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(factors (n, 4): brightness, contrast, saturation, hue shift; order (n, 4))."""
        draws = u[:, self.slices["jitter"]]
        ranges = [(max(0.0, 1 - j), 1 + j) for j in self.preset.jitter[:3]]
        ranges.append((-self.preset.jitter[3], self.preset.jitter[3]))
        factors = torch.stack([draws[:, i] * (hi - lo) + lo for i, (lo, hi) in enumerate(ranges)], 1)
        return factors, torch.argsort(draws[:, 4:], dim=1)

    def plan(self, u: torch.Tensor, size: int = 32, sync_free: bool | None = None) -> torch.Tensor:
        """Everything the draws `u` decide, per sample, as one (n, D) table: the warp's reads
        (`reads_of` its stages) and the jitter's coefficients (`jitter_plan`). The engine plans a
        whole epoch at its start, so a step launches only the passes over its images."""
        sync_free = u.device.type != "cpu" if sync_free is None else sync_free
        parts = [u.new_zeros(len(u), 0)]
        if self.preset.geometric:
            parts.append(reads_of(self.geometry(u, size)).flatten(1))
        if self.preset.jitter:
            parts.append(jitter_plan(*self.colour(u), sync_free))
        return torch.cat(parts, 1)

    def apply_plan(self, images: torch.Tensor, plan: torch.Tensor,
                   sync_free: bool | None = None) -> torch.Tensor:
        """A uint8 batch augmented as its rows of `plan` say, normalised."""
        sync_free = plan.device.type != "cpu" if sync_free is None else sync_free
        x = images.float().div_(255)
        at = 0
        if self.preset.geometric:
            stages = self.stages
            x = warp_reads(x, plan[:, :stages * WARP_COLUMNS].view(len(x), stages, 3, 3))
            at = stages * WARP_COLUMNS
        if self.preset.jitter:
            x = jitter_by_plan(x, plan[:, at:], sync_free)
        return normalize(x)

    def plan_width(self, sync_free: bool) -> int:
        """Columns of `plan`'s table: the warp's reads, then the jitter's coefficients."""
        return (self.stages * WARP_COLUMNS if self.preset.geometric else 0) + (
            jitter_width(sync_free) if self.preset.jitter else 0)

    @property
    def stages(self) -> int:
        """Matrices the warp applies in turn (a leading flip folds into the next: _merge_exact)."""
        p = self.preset
        count = sum(bool(v) for v in (p.flip, p.rotation, p.crop_padding, p.translate,
                                      p.perspective))
        return count - 1 if count > 1 and p.flip else count

    def apply(self, images: torch.Tensor, u: torch.Tensor, sync_free: bool | None = None
              ) -> torch.Tensor:
        return self.apply_plan(images, self.plan(u, images.shape[-1], sync_free), sync_free)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(len(images), generator))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def prepare_eval(images: torch.Tensor) -> torch.Tensor:
    """Evaluation transform: ToTensor + Normalize, as in the notes."""
    return normalize(images.float().div_(255))


__all__ = ["PRESETS", "Augment", "Preset", "prepare_eval"]
