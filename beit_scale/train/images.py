"""Pictures people would rather see than numbers: masks and tokenizer reconstructions, as PNG and in TensorBoard."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def save_mask_grid(batch: dict, mean, std, path: Path, writer=None, num: int = 8) -> None:
    """Patch views of the first images with their masked patches greyed out."""
    images = batch["image"][:num].float().cpu()
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    images = (images * std_t + mean_t).clamp(0, 1)  # (n, 3, H, W) in [0, 1]
    n, _, h, w = images.shape
    grid = int(batch["mask"].shape[1] ** 0.5)
    mask = batch["mask"][:num].view(n, 1, grid, grid).float().cpu()
    mask = torch.nn.functional.interpolate(mask, size=(h, w), mode="nearest")  # (n, 1, H, W)
    masked = images * (1 - mask) + 0.5 * mask
    _save(torch.cat([images, masked]), n, path, writer, "pretrain/masks")


def save_reconstructions(originals: torch.Tensor, recons: torch.Tensor, path: Path, writer=None, step: int = 0) -> None:
    """Originals (top row) above their reconstructions from hard tokens (bottom row); pixels in [0, 1]."""
    _save(torch.cat([originals, recons]).clamp(0, 1), len(originals), path, writer, "tokenizer/reconstructions", step)


def _save(images: torch.Tensor, per_row: int, path: Path, writer, tag: str, step: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=per_row, padding=1)
    if writer is not None:
        writer.add_image(tag, make_grid(images, nrow=per_row, padding=1), step)
