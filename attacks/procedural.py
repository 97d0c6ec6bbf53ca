"""Procedural trigger artwork, made by this project from a seed.

* :func:`sticker`: the "abstract sticker", a full-frame flat-shaded cartoon of random shapes with
  dark outlines on a pastel background.  It stands in for backdoor-toolbox's ``hellokitty`` image
  (Blend, AdaptiveBlend).  :func:`sticker_seed` walks seeds deterministically from a base seed to
  the first whose 32-px rendering meets the acceptance window below, and the same seed is then
  rendered natively at every resolution.
* :func:`badge`: the "orb badge", a blue/purple disc inside a yellow-orange-red ring with a gap,
  in the top-right corner.  It stands in for the ``firefox_corner`` logo (PhysicalBA,
  AdaptivePatch); :func:`badge_quadrants` cuts it into the four pieces of the ``firefox4`` preset.
* Simple patches: :func:`corner_checker4`, :func:`phoenix_patch`, :func:`trojan_square`.

Everything is rendered natively at the requested size with 8x supersampling and area
downsampling (never an upsampled small asset), returns ``(pattern C x H x W float in [0,1],
mask H x W float)`` with an explicit mask, and is cached in memory (``functools.lru_cache``
keyed by size/channels/seed).  RGB artwork is converted to luminance (ITU-R BT.601 weights) for
1-channel data.  Callers get fresh tensors, so the cache cannot be modified through them.
"""
from __future__ import annotations

import colorsys
import math
from functools import lru_cache

import numpy as np
import torch

#: supersampling factor of every rendering
SUPERSAMPLE = 8
#: BT.601 luminance weights for 1-channel data
LUMA = (0.299, 0.587, 0.114)

#: the sticker's acceptance window, measured on the 32-px RGB rendering
STICKER_MEAN = (0.5, 0.85)
STICKER_STD = (0.2, 0.4)
STICKER_GRAD = (0.07, 0.2)
#: how many seeds :func:`sticker_seed` tries before giving up
STICKER_MAX_TRIES = 1000


def _out(rgb: np.ndarray, mask: np.ndarray, channels: int):
    """HxWx3 float RGB + HxW mask -> (C x H x W tensor, H x W tensor), luminance for 1 channel."""
    if channels == 1:
        img = (rgb @ np.asarray(LUMA))[None]
    elif channels == 3:
        img = rgb.transpose(2, 0, 1)
    else:
        raise ValueError(f"channels: {channels} is not 1 or 3")
    return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)), \
        torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))


def _downsample(a: np.ndarray, f: int) -> np.ndarray:
    """Area (box) downsampling of an (H*f) x (W*f) [x C] array by ``f``."""
    h, w = a.shape[0] // f, a.shape[1] // f
    return a.reshape(h, f, w, f, *a.shape[2:]).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------
# (a) abstract sticker

def _sticker_rgb(size: int, seed: int) -> np.ndarray:
    """Render the sticker of ``seed`` at ``size`` px: H x W x 3 float in [0, 1]."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLE
    # 1. pastel background: HSV value ~0.97, saturation ~0.3, random hue
    bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 0.4), rng.uniform(0.94, 1.0))
    im = Image.new("RGB", (big, big), tuple(int(round(255 * c)) for c in bg))
    draw = ImageDraw.Draw(im)
    # 2. 12-14 shapes in decreasing size, largest ~0.5 R
    n = int(rng.integers(12, 15))
    sizes = np.sort(rng.uniform(0.12, 0.5, n))[::-1]
    sizes[0] = 0.5
    outline = max(1, round(0.035 * big))
    for s in sizes:
        d = s * big
        cx, cy = rng.uniform(0.05, 0.95, 2) * big
        r = rng.uniform()
        # 3. fills: saturated (60%), white (25%), near-black (15%)
        if r < 0.6:
            fill = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0))
        elif r < 0.85:
            fill = (1.0, 1.0, 1.0)
        else:
            fill = (0.1, 0.1, 0.12)
        fill = tuple(int(round(255 * c)) for c in fill)
        line = (25, 20, 30)
        kind = rng.integers(3)
        aspect = rng.uniform(0.6, 1.4)
        w, h = d * aspect / 2, d / aspect / 2
        if kind == 0:
            draw.ellipse([cx - w, cy - h, cx + w, cy + h], fill=fill, outline=line, width=outline)
        elif kind == 1:
            draw.rounded_rectangle([cx - w, cy - h, cx + w, cy + h], radius=0.3 * min(w, h), fill=fill,
                                   outline=line, width=outline)
        else:
            k = int(rng.integers(3, 6))
            a0 = rng.uniform(0, 2 * math.pi)
            pts = [(cx + w * math.cos(a0 + 2 * math.pi * i / k), cy + h * math.sin(a0 + 2 * math.pi * i / k))
                   for i in range(k)]
            draw.polygon(pts, fill=fill, outline=line, width=outline)
    a = np.asarray(im, dtype=np.float64) / 255
    return _downsample(a, SUPERSAMPLE)


def sticker_stats(rgb: np.ndarray) -> dict:
    """Channel means/stds and mean absolute horizontal/vertical differences of an H x W x 3 image."""
    return {"mean": rgb.mean(axis=(0, 1)), "std": rgb.std(axis=(0, 1)),
            "grad_x": float(np.abs(np.diff(rgb, axis=1)).mean()),
            "grad_y": float(np.abs(np.diff(rgb, axis=0)).mean())}


def sticker_accepted(rgb: np.ndarray) -> bool:
    s = sticker_stats(rgb)
    inside = lambda v, lo_hi: bool(np.all((lo_hi[0] <= np.asarray(v)) & (np.asarray(v) <= lo_hi[1])))  # noqa: E731
    return (inside(s["mean"], STICKER_MEAN) and inside(s["std"], STICKER_STD)
            and inside([s["grad_x"], s["grad_y"]], STICKER_GRAD))


@lru_cache(maxsize=None)
def sticker_seed(base_seed: int = 0) -> int:
    """The first seed ``base_seed, base_seed + 1, ...`` whose 32-px sticker passes the acceptance window."""
    for seed in range(base_seed, base_seed + STICKER_MAX_TRIES):
        if sticker_accepted(_sticker_rgb(32, seed)):
            return seed
    raise RuntimeError(f"no sticker seed in [{base_seed}, {base_seed + STICKER_MAX_TRIES}) passes the window")


@lru_cache(maxsize=32)
def _sticker_cached(size: int, channels: int, seed: int):
    rgb = _sticker_rgb(size, sticker_seed(seed))
    return _out(rgb, np.ones((size, size)), channels)


def sticker(size: int, channels: int = 3, seed: int = 0):
    """The accepted sticker for ``seed`` (see :func:`sticker_seed`) at ``size`` px: (pattern, mask ≡ 1)."""
    p, m = _sticker_cached(size, channels, seed)
    return p.clone(), m.clone()


# ---------------------------------------------------------------------------------------------
# (b) orb badge

#: badge geometry as fractions of the image side R
BADGE_DIAMETER = 0.41
BADGE_TOP = 0.03
BADGE_RIGHT = 0.04
#: inner disc radius / badge radius
BADGE_INNER = 0.62
#: ring gap, degrees, centred on the upper right (45 degrees above the horizontal)
BADGE_GAP_DEG = 40.0
BLUE, PURPLE = np.array([0.2, 0.55, 1.0]), np.array([0.45, 0.2, 0.75])
YELLOW, ORANGE, RED = np.array([1.0, 0.85, 0.1]), np.array([1.0, 0.45, 0.05]), np.array([0.9, 0.1, 0.3])
#: darkest value a logo pixel may take (no exact black)
MIN_LOGO_VALUE = 1 / 255
#: the firefox4 cut, as a fraction of the logo's bounding box (7/13 of its height and width)
QUADRANT_CUT = 7 / 13


def _badge_rgb(size: int, seed: int, diameter: float = BADGE_DIAMETER, top: float = BADGE_TOP,
               right: float = BADGE_RIGHT):
    """Badge at ``size`` px: (H x W x 3 colour, H x W binary mask).  ``seed`` turns the ring's
    gap and colour sweep by up to +-15 degrees (seed 0: the canonical upper-right gap);
    ``diameter``, ``top`` and ``right`` (margins) are fractions of the image side."""
    rng = np.random.default_rng(seed)
    turn = 0.0 if seed == 0 else rng.uniform(-15, 15)
    f = SUPERSAMPLE
    big = size * f
    r = diameter * size / 2
    cy, cx = top * size + r, size - right * size - r
    yy, xx = (np.mgrid[0:big, 0:big] + 0.5) / f  # sub-pixel centres in pixel units
    dy, dx = yy - cy, xx - cx
    rho = np.hypot(dx, dy) / r
    # angle measured counter-clockwise from the +x axis with y pointing up, in [0, 360)
    ang = (np.degrees(np.arctan2(-dy, dx)) - turn) % 360
    inner = rho <= BADGE_INNER
    gap_centre = 45.0
    in_gap = np.abs((ang - gap_centre + 180) % 360 - 180) < BADGE_GAP_DEG / 2
    ring = (rho > BADGE_INNER) & (rho <= 1.0) & ~in_gap
    # inner disc: radial gradient blue -> purple
    t = np.clip(rho / BADGE_INNER, 0, 1)[..., None]
    disc_col = (1 - t) * BLUE + t * PURPLE
    # ring: angular gradient yellow -> orange -> red-magenta, starting after the gap
    u = ((ang - gap_centre - BADGE_GAP_DEG / 2) % 360) / (360 - BADGE_GAP_DEG)
    u = np.clip(u, 0, 1)[..., None]
    ring_col = np.where(u < 0.5, (1 - 2 * u) * YELLOW + 2 * u * ORANGE, (2 - 2 * u) * ORANGE + (2 * u - 1) * RED)
    cover = (inner | ring).astype(np.float64)
    col = np.where(inner[..., None], disc_col, ring_col) * cover[..., None]
    cov = _downsample(cover, f)
    rgb = _downsample(col, f) / np.maximum(cov, 1e-9)[..., None]  # mean colour of the covered part
    mask = (cov > 0.5).astype(np.float64)
    rgb = np.clip(rgb, MIN_LOGO_VALUE, 1.0) * mask[..., None]
    return rgb, mask


@lru_cache(maxsize=32)
def _badge_cached(size: int, channels: int, seed: int, geometry: tuple):
    rgb, mask = _badge_rgb(size, seed, *geometry)
    p, m = _out(rgb, mask, channels)
    if channels == 1:  # luminance can not reach exact black either
        p = torch.where(m.bool()[None], p.clamp(min=MIN_LOGO_VALUE), p)
    return p, m


def badge(size: int, channels: int = 3, seed: int = 0, diameter: float = BADGE_DIAMETER,
          top: float = BADGE_TOP, right: float = BADGE_RIGHT):
    """The orb badge in the top-right corner: (pattern, binary mask)."""
    p, m = _badge_cached(size, channels, seed, (float(diameter), float(top), float(right)))
    return p.clone(), m.clone()


def badge_quadrants(size: int, channels: int = 3, seed: int = 0, **geometry):
    """The badge cut at 7/13 of its bounding box into TL, TR, BL, BR: four (pattern, mask) pairs
    whose masks partition the badge's mask."""
    p, m = badge(size, channels, seed, **geometry)
    rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    cut_r = top + round(QUADRANT_CUT * (bottom - top))
    cut_c = left + round(QUADRANT_CUT * (right - left))
    r_idx, c_idx = torch.arange(size)[:, None], torch.arange(size)[None, :]
    out = []
    for in_rows in (r_idx < cut_r, r_idx >= cut_r):
        for in_cols in (c_idx < cut_c, c_idx >= cut_c):
            q = m * (in_rows & in_cols).float()
            out.append((p * q, q))
    return out


# ---------------------------------------------------------------------------------------------
# (c) simple patches (sizes scale with R/32)

def _prop(side_at_32: float, size: int) -> int:
    return max(1, round(side_at_32 * size / 32))


def corner_checker4(channels: int, size: int, side: int | None = None):
    """backdoor-toolbox's ``badnet_patch4``: the 3x3 checker in all four corners (explicit mask)."""
    side = side or _prop(3, size)
    cell = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float32)
    block = torch.nn.functional.interpolate(cell[None, None], size=(side, side), mode="nearest")[0, 0]
    pattern, mask = torch.zeros(channels, size, size), torch.zeros(size, size)
    for r in (0, size - side):
        for c in (0, size - side):
            pattern[:, r:r + side, c:c + side] = block
            mask[r:r + side, c:c + side] = 1
    return pattern, mask


#: phoenix texture range per channel (R, G, B) in 0..255
PHOENIX_LOW = (63, 124, 226)


@lru_cache(maxsize=32)
def _phoenix_cached(channels: int, size: int, seed: int, both_corners: bool):
    side = _prop(5, size)
    g = torch.Generator().manual_seed(seed)
    low = torch.tensor(PHOENIX_LOW, dtype=torch.float32)[:, None, None] / 255
    tex = low + (1 - low) * torch.rand(3, side, side, generator=g)
    if channels == 1:
        tex = (torch.tensor(LUMA)[:, None, None] * tex).sum(0, keepdim=True)
    pattern, mask = torch.zeros(channels, size, size), torch.zeros(size, size)
    for c in ((0, size - side) if both_corners else (size - side,)):
        pattern[:, size - side:, c:c + side] = tex
        mask[size - side:, c:c + side] = 1
    return pattern, mask


def phoenix_patch(channels: int, size: int, seed: int = 0, both_corners: bool = False):
    """A bright bluish-white seeded texture, 5x5 at 32 px, bottom-right (``phoenix_corner``) or at
    both bottom corners (``phoenix_corner2``, the same texture twice)."""
    p, m = _phoenix_cached(channels, size, seed, both_corners)
    return p.clone(), m.clone()


@lru_cache(maxsize=32)
def _trojan_cached(channels: int, size: int, seed: int):
    side, margin = _prop(8, size), _prop(3, size)
    g = torch.Generator().manual_seed(seed)
    tex = torch.rand(3, side, side, generator=g)
    if channels == 1:
        tex = (torch.tensor(LUMA)[:, None, None] * tex).sum(0, keepdim=True)
    pattern, mask = torch.zeros(channels, size, size), torch.zeros(size, size)
    lo = size - margin - side
    pattern[:, lo:lo + side, lo:lo + side] = tex
    mask[lo:lo + side, lo:lo + side] = 1
    return pattern, mask


def trojan_square(channels: int, size: int, seed: int = 0):
    """Uniform RGB noise in an 8x8 box 3 px from the bottom-right edges (at 32 px), full mask."""
    p, m = _trojan_cached(channels, size, seed)
    return p.clone(), m.clone()
