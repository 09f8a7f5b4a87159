"""SSIM as leakbench computes it everywhere: torchmetrics' Gaussian-window SSIM (data range 1, reflect
padding), with the window shrunk for images smaller than the standard 11 pixels; one definition of that
window for the per-sample metric and the pairwise matrix."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ssim_kernel(image_shape: tuple[int, ...]) -> tuple[int, float]:
    """(kernel size, sigma) for images of ``image_shape`` (..., H, W): 11 and 1.5 as standard, an odd
    size no larger than the image for tiny ones, with sigma scaled alike."""
    side = min(image_shape[-2:])
    kernel = 11 if side >= 11 else max(3, side - 1 if side % 2 == 0 else side)
    return kernel, 1.5 * kernel / 11


def ssim_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair ``(x[i], y[i])``, images on [0, 1]: a vector of ``len(x)``."""
    # on first use: importing torchmetrics takes about a second, and most commands never compute SSIM
    from torchmetrics.functional.image import structural_similarity_index_measure

    kernel, sigma = ssim_kernel(x.shape)
    values = structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=kernel, sigma=sigma,
                                                 reduction="none")
    return values.reshape(-1)


def pairwise_ssim(samples: torch.Tensor, references: torch.Tensor, *, reference_chunk: int = 8) -> torch.Tensor:
    """SSIM of every (sample, reference) pair, both on [0, 1]: an ``(n, m)`` matrix equal to torchmetrics'
    SSIM with :func:`ssim_per_sample`'s settings (reflect padding, Gaussian window, data range 1).

    Why not torchmetrics itself: it pads and filters both images again for every pair (five full 2-D
    filterings), about 5x slower. Here each image's local means and variances are filtered once, and
    per pair only the product image is, with the separable window (two 1-D passes), a few references
    at a time so that the working set stays in cache."""
    kernel, sigma = ssim_kernel(samples.shape)
    size = int(3.5 * sigma + 0.5) * 2 + 1  # the window torchmetrics builds for that sigma
    pad = (size - 1) // 2
    if min(samples.shape[-2:]) <= pad:  # reflect padding needs the image to be wider than the pad
        n, m = len(samples), len(references)
        return ssim_per_sample(samples.repeat_interleave(m, 0), references.repeat(n, 1, 1, 1)).view(n, m)
    channels = samples.shape[1]
    dist = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    line = torch.exp(-((dist / sigma) ** 2) / 2)
    line = line / line.sum()
    rows = line.view(1, 1, 1, size).repeat(channels, 1, 1, 1)
    cols = line.view(1, 1, size, 1).repeat(channels, 1, 1, 1)

    def window_mean(padded: torch.Tensor) -> torch.Tensor:  # (B, C, H + 2 pad, W + 2 pad) -> (B, C, H, W)
        return F.conv2d(F.conv2d(padded, rows, groups=channels), cols, groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    xp = F.pad(samples.float(), (pad, pad, pad, pad), mode="reflect")
    yp = F.pad(references.float(), (pad, pad, pad, pad), mode="reflect")
    mu_x, mu_y = window_mean(xp)[:, None], window_mean(yp)[None]       # (n, 1, C, H, W), (1, m, C, H, W)
    var_x = (window_mean(xp * xp)[:, None] - mu_x ** 2).clamp_min(0)
    var_y = (window_mean(yp * yp)[None] - mu_y ** 2).clamp_min(0)
    n = len(samples)
    out = []
    for start in range(0, len(references), reference_chunk):
        part = slice(start, start + reference_chunk)
        chunk = yp[part]
        products = (xp[:, None] * chunk[None]).view(n * len(chunk), channels, *xp.shape[-2:])
        exy = window_mean(products).view(n, len(chunk), channels, *samples.shape[-2:])
        mu_xy = mu_x * mu_y[:, part]
        # in place on the (n, chunk, C, H, W) tensors: SSIM = luminance term * contrast-structure term
        structure = exy.sub_(mu_xy).mul_(2).add_(c2).div_((var_x + var_y[:, part]).add_(c2))
        luminance = mu_xy.mul_(2).add_(c1).div_((mu_x ** 2 + mu_y[:, part] ** 2).add_(c1))
        out.append(structure.mul_(luminance).flatten(2).mean(-1))
    return torch.cat(out, 1)
