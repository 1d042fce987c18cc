"""Pictures people would rather see than numbers: masks and tokenizer reconstructions, as PNG and in TensorBoard."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def save_mask_grid(batch: dict, mean, std, path: Path, writer=None, num: int = 8) -> None:
    """Patch views of the first images with their masked patches greyed out."""
    images = denormalize(batch["image"][:num], mean, std)  # (n, 3, H, W) in [0, 1]
    masked = grey_out(images, batch["mask"][:num])
    _save(torch.cat([images, masked]), len(images), path, writer, "pretrain/masks")


def denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised (n, 3, H, W) patch views -> float32 pixels in [0, 1] on the CPU."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images.float().cpu() * std_t + mean_t).clamp(0, 1)


def grey_out(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) pixels in [0, 1] with the patches that the (n, h*w) bool mask marks set to grey (0.5)."""
    n, _, h, w = images.shape
    grid = int(mask.shape[1] ** 0.5)
    m = mask.reshape(n, 1, grid, grid).to(images.device, images.dtype)
    m = torch.nn.functional.interpolate(m, size=(h, w), mode="nearest")  # (n, 1, H, W)
    return images * (1 - m) + 0.5 * m


def save_reconstructions(originals: torch.Tensor, recons: torch.Tensor, path: Path, writer=None, step: int = 0) -> None:
    """Originals (top row) above their reconstructions from hard tokens (bottom row); pixels in [0, 1]."""
    _save(torch.cat([originals, recons]).clamp(0, 1), len(originals), path, writer, "tokenizer/reconstructions", step)


def _save(images: torch.Tensor, per_row: int, path: Path, writer, tag: str, step: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=per_row, padding=1)
    if writer is not None:
        writer.add_image(tag, make_grid(images, nrow=per_row, padding=1), step)
