"""Differentiable data augmentation for poison crafting (as in Witches' Brew, Geiping et al. 2021).

Poisons are optimised through the augmentation a victim applies while training, so that
they survive it: a random translation and a random horizontal flip, both applied through
one affine sampling grid (``F.affine_grid`` + ``F.grid_sample``), so the output is a
differentiable function of the input pixels and gradients flow back to the perturbation.

Geometry. ``align_corners=False`` with zero padding: pixel ``j`` of a row of width ``W`` has
its centre at ``x_j = (2j + 1) / W - 1`` in grid coordinates, so a shift of ``k`` pixels is a
grid translation of ``2k / W`` and a flip is ``x -> -x``. For integer shifts (and flips) every
sampling point falls exactly on a pixel centre: bilinear sampling is then an exact copy of
pixels (zeros where the shifted image leaves the frame), like ``RandomCrop(padding)``. For
fractional shifts it interpolates between neighbouring pixels.

Convention: a shift ``(dx, dy)`` moves the picture ``dx`` pixels to the right and ``dy``
pixels down; with a flip, the image is mirrored first, then shifted:
``out[..., i, j] = in[..., i - dy, W - 1 - (j - dx)]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def translate_flip(
    x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, *, mode: str = "bilinear"
) -> torch.Tensor:
    """Shift each image by ``(dx[i], dy[i])`` pixels (floats allowed) and mirror it where ``flip[i]``.

    ``x`` is ``N x C x H x W``; ``dx``, ``dy`` (pixels) and ``flip`` (bool) have length ``N``.
    Pixels coming from outside the image are zero. Differentiable with respect to ``x``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be N x C x H x W, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    dx = torch.as_tensor(dx, dtype=x.dtype, device=x.device).reshape(n)
    dy = torch.as_tensor(dy, dtype=x.dtype, device=x.device).reshape(n)
    sign = 1.0 - 2.0 * torch.as_tensor(flip, device=x.device).reshape(n).to(x.dtype)  # -1 where flipped
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    # Output point (u, v) samples the input at (sign * (u - 2dx/W), v - 2dy/H).
    theta[:, 0, 0] = sign
    theta[:, 0, 2] = -sign * 2.0 * dx / w
    theta[:, 1, 1] = 1.0
    theta[:, 1, 2] = -2.0 * dy / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def default_max_shift(image_size: int) -> float:
    """Witches' Brew-style default: one eighth of the image side (4 pixels on 32 x 32)."""
    return image_size / 8.0


def differentiable_augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    max_shift: float | None = None,
    flip: bool = True,
    integer_shifts: bool = False,
) -> torch.Tensor:
    """Random translation (uniform in ``[-max_shift, max_shift]`` pixels per axis and image) and
    random horizontal flip (probability 0.5), drawn from ``generator`` (a CPU ``torch.Generator``).

    ``max_shift`` defaults to :func:`default_max_shift` of the image width. With
    ``integer_shifts`` the shifts are rounded to whole pixels (exactly what ``RandomCrop``
    with zero padding produces); otherwise they are continuous, as in Witches' Brew.
    """
    n, _, _, w = x.shape
    shift = default_max_shift(w) if max_shift is None else float(max_shift)
    if shift < 0:
        raise ValueError(f"max_shift must be >= 0 pixels, got {max_shift}")
    offsets = (torch.rand(2, n, generator=generator, dtype=torch.float64) * 2.0 - 1.0) * shift
    if integer_shifts:
        offsets = offsets.round()
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return translate_flip(x, offsets[0].to(x.dtype), offsets[1].to(x.dtype), flips)
