"""Semantic segmentation scores from a confusion matrix: aAcc, mIoU, mAcc and per-class IoU, as mmseg reports them.

The matrix ``(num_classes, num_classes)`` counts pixels by (label, prediction); pixels labelled ``ignore_index``
are left out. It is summed over batches and, when ``torch.distributed`` is initialised, over ranks, so every rank
scores the whole evaluation set. As in mmseg's ``mean_iou``:

* IoU of a class = intersection / union; NaN when the class is in neither the labels nor the predictions;
* Acc of a class = intersection / labelled pixels; NaN when the class is absent from the labels;
* mIoU and mAcc are the means over the non-NaN classes, aAcc = correct pixels / labelled pixels.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

IGNORE_INDEX = 255  # the label of unlabelled and padded pixels (beit_scale.data.segmentation.IGNORE_INDEX)


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX,
                     reduce_zero_label: bool = False) -> Tensor:
    """Pixel counts ``(num_classes, num_classes)`` int64, rows the label, columns the prediction.

    Args:
        pred: predicted class per pixel, any shape, on any device.
        label: ground truth of the same shape.
        num_classes: number of classes; labels outside ``[0, num_classes)`` other than ``ignore_index`` are an error.
        ignore_index: label of pixels to leave out.
        reduce_zero_label: shift the labels first as ADE20K's (0 ignored, c -> c - 1), for raw annotations.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} must have one shape; "
                         "resize the logits to the label before argmax")
    label = label.long()
    if reduce_zero_label:
        label = torch.where(label == 0, ignore_index, label - 1)
        label = torch.where(label == ignore_index - 1, ignore_index, label)
    keep = label != ignore_index
    label, pred = label[keep], pred.long()[keep]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"labels span [{label.min().item()}, {label.max().item()}] but num_classes={num_classes} "
                         f"(and ignore_index={ignore_index}): check the dataset's reduce_zero_label and num_classes")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions span [{pred.min().item()}, {pred.max().item()}], outside [0, {num_classes})")
    flat = label * num_classes + pred
    return torch.bincount(flat, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def all_reduce_confusion(matrix: Tensor) -> Tensor:
    """The sum of ``matrix`` over all ranks when ``torch.distributed`` is initialised, else ``matrix`` itself.

    With NCCL the matrix must be on this rank's GPU. Returns a new tensor; ``matrix`` is not changed.
    """
    matrix = matrix.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
    return matrix


def scores(matrix: Tensor, class_names: list[str] | None = None) -> dict[str, float]:
    """``{"aAcc", "mIoU", "mAcc", "IoU.<class>" ...}`` (fractions, NaN where undefined) of a confusion matrix."""
    m = matrix.double().cpu()
    intersection = m.diagonal()
    labelled, predicted = m.sum(1), m.sum(0)
    union = labelled + predicted - intersection
    iou = intersection / union  # 0/0 = NaN: class in neither
    acc = intersection / labelled  # NaN: class absent from the labels
    total = labelled.sum().item()
    names = class_names or [str(i) for i in range(m.shape[0])]
    if len(names) != m.shape[0]:
        raise ValueError(f"{len(names)} class names for a {m.shape[0]}-class matrix")
    out = {"aAcc": intersection.sum().item() / total if total else math.nan,
           "mIoU": _nanmean(iou), "mAcc": _nanmean(acc)}
    out.update({f"IoU.{n}": v for n, v in zip(names, iou.tolist())})
    out.update({f"Acc.{n}": v for n, v in zip(names, acc.tolist())})
    return out


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return x.mean().item() if x.numel() else math.nan


class SegmentationMeter:
    """Accumulates the confusion matrix over an evaluation; :meth:`compute` all-reduces over ranks and scores it."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add one batch: ``pred`` class indices (or logits ``(B, K, H, W)``, argmaxed) and labels ``(B, H, W)``."""
        if pred.ndim == label.ndim + 1:
            pred = pred.argmax(1)
        self.matrix += confusion_matrix(pred, label, self.num_classes, self.ignore_index).to(self.matrix.device)

    def compute(self, class_names: list[str] | None = None) -> dict[str, float]:
        return scores(all_reduce_confusion(self.matrix), class_names)
