"""Data side of BEiT pretraining: image folders and tar shards, two-view transforms, masked-image-modeling samples."""

from beit_scale.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from beit_scale.data.fashion_mnist import export_fashion_mnist, find_fashion_mnist
from beit_scale.data.classification import ClassificationSet, class_balanced_subset, eval_shard
from beit_scale.data.folder import SafeImageFolder
from beit_scale.data.loader import make_loader
from beit_scale.data.mim import MIMDataset
from beit_scale.data.sampler import ResumableDistributedSampler
from beit_scale.data.shard_writer import write_shards
from beit_scale.data.shards import ShardDataset
from beit_scale.data.source import open_images
from beit_scale.data.transforms import EvalTwoView, TwoViewTransform

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ClassificationSet",
    "EvalTwoView",
    "MIMDataset",
    "ResumableDistributedSampler",
    "SafeImageFolder",
    "ShardDataset",
    "TwoViewTransform",
    "class_balanced_subset",
    "eval_shard",
    "export_fashion_mnist",
    "find_fashion_mnist",
    "make_loader",
    "open_images",
    "write_shards",
]
