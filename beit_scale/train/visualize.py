"""What a pretrained BEiT sees and predicts, as pictures (``beit-scale visualize``; pretraining's evaluation can add
the same pictures to TensorBoard through :func:`pictures` and :func:`write_pictures`).

One grid per picture kind, each over the first images of a batch of deterministic eval views with seeded masks:

* ``masks``: the patch views (top row) and the same with the masked patches greyed (bottom row);
* ``reconstructions``: the tokenizer views (top) and the tokenizer's decoder output from their tokens (bottom);
* ``predictions``: the tokenizer views with the mask greyed (top), the tokenizer's reconstruction, i.e. the target
  decoded (middle), and the decoding of BEiT's argmax tokens on the masked patches with the tokenizer's own tokens
  on the visible ones (bottom);
* ``attention``: the last block's [CLS]-to-patch attention of each head over the unmasked image, as a heat map
  laid over it: one row per image, one column per head.

``reconstructions`` and ``predictions`` need a tokenizer with a decoder (:meth:`DiscreteVAE.decode_ids`); for one
without (a DALL-E encoder file, a VQ-KD tokenizer) or a ``masking.target=pixels`` run they are left out with a
logged note. Plain torch: no DeepSpeed.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.utils import make_grid, save_image

from beit_scale.adapters import patch_grid
from beit_scale.checkpoint import RunLayout
from beit_scale.checkpoint.tokenizer_file import load_tokenizer
from beit_scale.config import Config, load_config
from beit_scale.data import EvalTwoView, MIMDataset, SafeImageFolder
from beit_scale.data.folder import SkipUnreadable, load_rgb
from beit_scale.masking import build_mask_generator
from beit_scale.models import build_mim_model, masked_positions
from beit_scale.models.mim import BeitMIM
from beit_scale.train.images import denormalize, grey_out

log = logging.getLogger(__name__)

PAD_PX = 1  # between the pictures of a grid: a grid of r x c pictures of s px is r*(s+1)+1 by c*(s+1)+1 px
WEIGHT_FORMATS = ("beit_scale.mim.v1", "beit_scale.consolidated.v1")  # `beit-scale pretrain`, `consolidate`


# ------------------------------------------------------------------------------------------------ attention


def _qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v, each (B, heads, N, head_dim), as timm's Beit ``Attention`` computes them (q_bias, zero k, v_bias)."""
    qkv = attn.qkv(x)  # a module call, so that ZeRO-3 gathers its weight
    if attn.q_bias is not None:
        qkv = qkv + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    b, n, _ = x.shape
    return qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def attention_weights(attn: nn.Module, x: Tensor, shared_rel_pos_bias: Optional[Tensor] = None) -> Tensor:
    """The attention probabilities timm's Beit ``Attention`` uses but does not return.

    Args:
        attn: A block's ``attn`` (``timm.models.beit.Attention``).
        x: (B, N, D) its input (the block's ``norm1`` output), N = 1 + patches.
        shared_rel_pos_bias: (heads, N, N) what the model passes every block (:meth:`BeitMIM.rel_pos_bias`), if any.

    Returns:
        (B, heads, N, N) float32 softmax over the keys of ``q k^T * scale`` plus the block's own and the shared
        relative position biases.
    """
    q, k, _ = _qkv(attn, x)
    logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, heads, N, N)
    if attn.relative_position_bias_table is not None:
        logits = logits + attn._get_rel_pos_bias().float()
    if shared_rel_pos_bias is not None:
        logits = logits + shared_rel_pos_bias.float()
    return logits.softmax(dim=-1)


def attend(attn: nn.Module, x: Tensor, weights: Tensor) -> Tensor:
    """(B, N, D) the attention output from ``weights`` (:func:`attention_weights`): ``weights @ v``, then ``proj``."""
    _, _, v = _qkv(attn, x)
    out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, N, heads*head_dim)
    return attn.proj(out)


class AttentionProbe(NamedTuple):
    """The last block's attention during one forward pass of a :class:`BeitMIM`."""

    weights: Tensor  # (B, heads, 1+N, 1+N) float32; row 0 is the [CLS] query
    recomputed: Tensor  # (B, 1+N, D) `attend` of `weights`: equals `output`
    output: Tensor  # (B, 1+N, D) what the module's own forward returned


def _unwrap(model: nn.Module) -> BeitMIM:
    return getattr(model, "module", model)  # a DeepSpeed engine holds the model as `.module`


def _inputs(model: BeitMIM, images: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(images, mask, flat masked indices) on the model's device and dtype; no mask: nothing masked."""
    param = model.cls_token
    if mask is None:
        mask = torch.zeros(images.shape[0], model.patch_embed.num_patches, dtype=torch.bool)
    mask = mask.bool().cpu()
    idx = masked_positions(mask)  # on the CPU: no sync
    return images.to(param.device, param.dtype), mask.to(param.device), idx.to(param.device)


@torch.no_grad()
def last_block_attention(model: nn.Module, images: Tensor, mask: Optional[Tensor] = None) -> AttentionProbe:
    """Run ``model`` (a :class:`BeitMIM`, or an engine holding one) on ``images`` and recompute its last block's
    attention from the input and relative position bias that block's ``attn`` receives.

    Args:
        images: (B, 3, H, W) normalised patch views.
        mask: (B, N) bool, True where the patch is replaced by [M]; None masks nothing.
    """
    model = _unwrap(model)
    attn, seen = model.blocks[-1].attn, {}

    def before(module, args, kwargs):
        x = args[0]  # (B, 1+N, D)
        bias = kwargs.get("shared_rel_pos_bias", args[1] if len(args) > 1 else None)
        seen["weights"] = attention_weights(module, x, bias)
        seen["recomputed"] = attend(module, x, seen["weights"])

    def after(module, args, kwargs, output):
        seen["output"] = output

    hooks = [attn.register_forward_pre_hook(before, with_kwargs=True),
             attn.register_forward_hook(after, with_kwargs=True)]
    try:
        model(*_inputs(model, images, mask))
    finally:
        for h in hooks:
            h.remove()
    return AttentionProbe(seen["weights"], seen["recomputed"], seen["output"])


def attention_maps(model: nn.Module, images: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """(B, heads, grid_h, grid_w) float32: how much the last block's [CLS] query attends to each patch key.

    Each map is a row of the softmax without its [CLS] column, so it sums to 1 minus the [CLS]-to-[CLS] weight.
    """
    gh, gw = _unwrap(model).grid_size
    weights = last_block_attention(model, images, mask).weights  # (B, heads, 1+N, 1+N)
    return weights[:, :, 0, 1:].reshape(weights.shape[0], weights.shape[1], gh, gw)


# ------------------------------------------------------------------------------------------------- pictures


def _heat(a: Tensor) -> Tensor:
    """(n, 1, H, W) values in [0, 1] -> (n, 3, H, W) a black-red-yellow-white ("hot") colour map."""
    return torch.cat([(3 * a).clamp(0, 1), (3 * a - 1).clamp(0, 1), (3 * a - 2).clamp(0, 1)], dim=1)


def _overlay(images: Tensor, maps: Tensor) -> Tensor:
    """(n, 3, H, W) pixels and (n, heads, h, w) maps -> (n * heads, 3, H, W): each map, scaled to [0, 1] and
    upsampled to the image (nearest: one patch stays one block), half over its image; image-major."""
    n, heads = maps.shape[:2]
    lo = maps.amin(dim=(2, 3), keepdim=True)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    scaled = (maps - lo) / (hi - lo).clamp_min(1e-12)
    up = F.interpolate(scaled.float().cpu(), size=images.shape[-2:], mode="nearest")  # (n, heads, H, W)
    heat = _heat(up.reshape(n * heads, 1, *images.shape[-2:]))
    return 0.5 * images.repeat_interleave(heads, dim=0) + 0.5 * heat


def _grid(rows: list[Tensor], per_row: int) -> Tensor:
    """Rows of pictures (each (per_row, 3, H, W) in [0, 1]) as one (3, H', W') grid."""
    return make_grid(torch.cat(rows).float().cpu().clamp(0, 1), nrow=per_row, padding=PAD_PX)


@contextlib.contextmanager
def _evaluating(*modules: nn.Module):
    """Eval mode inside, each module's own training mode restored after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def pictures(model: nn.Module, tokenizer, batch: dict, mean, std, num: int = 8) -> dict[str, Tensor]:
    """The picture grids of the module docstring for the first ``num`` images of ``batch``.

    Args:
        model: A :class:`BeitMIM` (or a DeepSpeed engine holding one); run in eval mode, its mode restored.
        tokenizer: The run's tokenizer (a :class:`VisualTokenizer` module), or None for ``masking.target=pixels``.
        batch: A :class:`MIMDataset` batch: ``image`` (B, 3, H, W) normalised patch views, ``tokenizer_view``
            (B, 3, S, S) in the tokenizer's pixel mapping, ``mask`` (B, N) bool. Pretraining's held-out batches
            (``EvalTwoView``, masks seeded from ``run.seed + 1``) are such batches.
        mean, std: The patch views' normalisation (``data.mean``, ``data.std``).
        num: How many images, from the first.

    Returns:
        {kind: (3, H', W') float image grid in [0, 1]}: ``masks`` and ``attention`` always; ``reconstructions`` and
        ``predictions`` where the tokenizer has a decoder (``predictions`` only for a token-predicting model).
    """
    model = _unwrap(model)
    images, mask = batch["image"][:num], batch["mask"][:num].bool().cpu()
    n = len(images)
    originals = denormalize(images, mean, std)  # (n, 3, H, W) in [0, 1]
    grids = {"masks": _grid([originals, grey_out(originals, mask)], n)}
    with _evaluating(model, *([tokenizer] if isinstance(tokenizer, nn.Module) else [])):
        maps = attention_maps(model, images)  # (n, heads, h, w), over the unmasked image
        grids["attention"] = _grid([_overlay(originals, maps)], maps.shape[1])
        if tokenizer is None or not hasattr(tokenizer, "decode_ids"):
            log.info("%s has no decoder (decode_ids): no reconstructions or predictions pictures",
                     "a masking.target=pixels run" if tokenizer is None else f"tokenizer {type(tokenizer).__name__}")
            return grids
        device = next(tokenizer.parameters()).device
        views = batch["tokenizer_view"][:num].to(device)
        unmap = getattr(tokenizer, "unmap_pixels", lambda x: x.clamp(0, 1))
        seen = unmap(views.float())  # (n, 3, S, S) what the tokenizer read, in [0, 1]
        ids = tokenizer.encode(views)  # (n, N)
        recon = unmap(tokenizer.decode_ids(ids).float())
        grids["reconstructions"] = _grid([seen, recon], n)
        if model.target != "tokens":
            return grids
        if ids.shape != mask.shape:
            raise ValueError(f"the tokenizer's {tuple(ids.shape)} tokens do not match the mask's {tuple(mask.shape)} "
                             "patches; tokenizer.input_size must give the model's patch grid")
        logits = model(*_inputs(model, images, mask))  # (n_masked, vocab)
        predicted = ids.clone()
        predicted[mask.to(device)] = logits.argmax(-1).to(device)  # row-major, as the logits
        grids["predictions"] = _grid([grey_out(seen, mask), recon, unmap(tokenizer.decode_ids(predicted).float())], n)
    return grids


def write_pictures(grids: dict[str, Tensor], out_dir: str | Path, writer=None, step: int = 0,
                   tag: str = "visualize") -> dict[str, Path]:
    """Write each grid of :func:`pictures` to ``out_dir/<kind>.png`` and, given a TensorBoard ``writer``, as image
    ``<tag>/<kind>`` at ``step``. Returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, grid in grids.items():
        paths[kind] = out_dir / f"{kind}.png"
        save_image(grid, str(paths[kind]))
        if writer is not None:
            writer.add_image(f"{tag}/{kind}", grid, step)
    return paths


# ------------------------------------------------------------------------------------- a run and its images


class _FlatFolder(SkipUnreadable, Dataset):
    """Image files directly in one folder, sorted by name, as ``(PIL RGB image, 0)``; unreadable ones skipped."""

    def __init__(self, root: Path, files: list[Path]) -> None:
        self._init_skipping(32)
        self.root, self.files = root, files
        self.transform = self.target_transform = None

    def __len__(self) -> int:
        return len(self.files)

    def _sample_name(self, index: int) -> str:
        return str(self.files[index])

    def _read_sample(self, index: int):
        return load_rgb(str(self.files[index])), 0


def open_picture_folder(path: str | Path) -> Dataset:
    """The images of a flat folder (``DIR/<image>``) or an ImageFolder (``DIR/<class>/<image>``), as
    ``(PIL RGB image, class index)``; unreadable files are skipped as in :class:`SafeImageFolder`."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"--images {path}: no such folder; pass a folder of images (DIR/<image> or "
                         "DIR/<class>/<image>)")
    files = sorted(p for p in root.iterdir() if p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS))
    if files:
        return _FlatFolder(root, files)
    if any(p.is_dir() for p in root.iterdir()):
        with contextlib.suppress(ValueError):  # no images in the class folders either: the message below
            return SafeImageFolder(root)
    raise ValueError(f"--images {path} holds no images ({', '.join(IMG_EXTENSIONS)}), neither directly "
                     "(DIR/<image>) nor in class folders (DIR/<class>/<image>)")


def load_run(run_dir: str | Path, weights: str | Path | None = None) -> tuple[Config, BeitMIM, Optional[nn.Module]]:
    """(config, BEiT in eval mode, tokenizer or None for ``masking.target=pixels``) of a pretraining run folder.

    ``weights``: a weights file (``beit-scale consolidate`` of one of the run's checkpoints); default the
    ``model.safetensors`` the finished run wrote.
    """
    layout = RunLayout(Path(run_dir))
    hint = "pass the run.output_dir of a `beit-scale pretrain` run"
    if not layout.root.is_dir():
        raise ValueError(f"{run_dir} is not a folder; {hint}")
    if not layout.config.is_file():
        raise ValueError(f"{run_dir} is not a run folder: it has no {layout.config.name} (written when a run "
                         f"starts); {hint}")
    cfg = load_config(str(layout.config))
    if cfg.run.job != "pretrain":
        raise ValueError(f"{run_dir} is a {cfg.run.job} run (run.job in its {layout.config.name}), not a "
                         f"pretraining run; {hint}")
    path = Path(weights) if weights else layout.model
    if not path.is_file():
        if weights:
            raise ValueError(f"--weights {weights}: no such file")
        raise ValueError(f"{run_dir} has no {layout.model.name} (the run has not finished); write the weights of "
                         f"its newest checkpoint with `beit-scale consolidate {run_dir} FILE.safetensors`, then pass "
                         "--weights FILE.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") not in WEIGHT_FORMATS:
        raise ValueError(f"{path} holds {meta.get('format')!r} weights, not a pretrained BEiT's "
                         f"({' or '.join(WEIGHT_FORMATS)})")
    if meta.get("model") and meta["model"] != cfg.model.name:
        raise ValueError(f"{path} holds a {meta['model']}, but the run trains a {cfg.model.name} (model.name)")
    tokenizer = None
    if cfg.masking.target == "tokens":
        if not Path(cfg.tokenizer.path).is_file():
            raise ValueError(f"the run's tokenizer.path={cfg.tokenizer.path!r} does not exist (a relative path is "
                             "read from the working directory: run from where the run was launched)")
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    model = build_mim_model(cfg.model, tokenizer.vocab_size if tokenizer is not None else 0, cfg.masking.target)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()][1:4]
        raise ValueError(f"{path} does not fit the run's {cfg.model.name} ({'; '.join(lines)[:400]})") from None
    return cfg, model.eval().requires_grad_(False), tokenizer


def visualize(run_dir: str | Path, images: str | Path, out: str | Path | None = None, num: int = 8,
              weights: str | Path | None = None, device: str | None = None) -> dict[str, Path]:
    """``beit-scale visualize``: the pictures of a pretraining run for the first ``num`` images of a folder.

    Each image gets the eval view (:class:`EvalTwoView`) and the run's mask, seeded as pretraining's held-out
    evaluation seeds it (``run.seed + 1``, the image's index). Writes ``out`` (default ``RUN/images/visualize``)
    ``/<kind>.png``; returns {kind: path}.
    """
    if not num >= 1:
        raise ValueError(f"--num {num} must be >= 1")
    cfg, model, tokenizer = load_run(run_dir, weights)
    found = open_picture_folder(images)
    grid, img_size = patch_grid(cfg)
    m, d = cfg.masking, cfg.data
    mask_gen = build_mask_generator(m.kind, (grid, grid), m.num_masked, m.min_block_patches, m.min_aspect)
    # pixels: no tokenizer reads a view; the cheapest one (a pixel per patch) is cut and never read
    transform = EvalTwoView(img_size, tokenizer.input_size if tokenizer is not None else grid, mean=d.mean,
                            std=d.std, tokenizer_pixel_map=tokenizer.map_pixels if tokenizer is not None else None)
    data = MIMDataset(found, transform, mask_gen, cfg.run.seed + 1)
    batch = default_collate([data[i] for i in range(min(num, len(data)))])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    if tokenizer is not None:
        tokenizer.to(device)
    grids = pictures(model, tokenizer, batch, d.mean, d.std, num)
    paths = write_pictures(grids, out if out is not None else RunLayout(Path(run_dir)).visualize)
    log.info("wrote %d pictures of %d images to %s", len(paths), len(batch["image"]),
             next(iter(paths.values())).parent)
    return paths
