"""Where a job's images come from: the recipe's ``data.format`` picks an ImageFolder or tar shards."""
from __future__ import annotations

from typing import TYPE_CHECKING

from beit_scale.data.folder import SafeImageFolder
from beit_scale.data.shards import ShardDataset

if TYPE_CHECKING:
    from beit_scale.config import DataConfig


def open_images(data: "DataConfig", root: str, arrays: bool = False) -> SafeImageFolder | ShardDataset:
    """The images under ``root`` (``data.root`` or ``data.val_root``) as ``(PIL RGB image, class index)`` samples,
    or ``((H, W, 3) uint8 array, class index)`` with ``arrays`` (JPEGs decoded by libjpeg-turbo straight into it).

    ``data.format=folder``: `SafeImageFolder` over an ImageFolder; ``shards``: `ShardDataset` over the OUT folder
    of ``beit-scale shard`` (checked against its manifest here). Both index the same images in the same order
    and skip an unreadable one the same way.
    """
    if data.format == "shards":
        return ShardDataset(root, arrays=arrays)
    return SafeImageFolder(root, arrays=arrays)
