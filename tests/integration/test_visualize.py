"""`beit-scale visualize` on a tiny pretraining run of real Fashion-MNIST: four PNG grids of the expected sizes, the
[CLS] attention recomputed from a block equals that block's own output, and bad inputs are refused by name."""
import shutil
import sys

import pytest
import torch
import yaml
from PIL import Image

from beit_scale.cli import main
from beit_scale.models import get_spec
from beit_scale.models.mim import BeitMIM
from beit_scale.train.visualize import (PAD_PX, attention_maps, last_block_attention, load_run, pictures,
                                        visualize, write_pictures)
from tests.distributed.ranks import run_ranks

MODEL = "beit_tiny_patch4_32"  # quickstart_pretrain's: 32 px, patch 4 (8x8 grid), 3 heads
PX, HEADS = 32, 3  # the patch view and the inputs' tokenizer view are both 32 px
PRETRAIN_TIMEOUT_S = 60  # about 18 s on a busy 2-core machine


@pytest.fixture(scope="module")
def run_dir(inputs, tmp_path_factory):
    """A finished 2-step single-process pretraining run (config.yaml, model.safetensors)."""
    data, tok = inputs
    out = tmp_path_factory.mktemp("visualize_run")
    run_ranks([sys.executable, "-m", "beit_scale.cli", "pretrain", "--config", "quickstart_pretrain",
               f"run.output_dir={out}", f"data.root={data}", f"tokenizer.path={tok}", "data.num_workers=0",
               "train.micro_batch=8", "train.global_batch=8", "train.total_steps=2", "optim.warmup_steps=1",
               f"data.val_root={data}", "train.eval_batches=1"],
              timeout=PRETRAIN_TIMEOUT_S)
    return out


@pytest.fixture(scope="module")
def flat_images(inputs, tmp_path_factory):
    """3 of the training images directly in one folder (no class folders)."""
    flat = tmp_path_factory.mktemp("flat_images")
    for i, path in enumerate(sorted(inputs[0].glob("*/*.png"))[:3]):
        shutil.copy(path, flat / f"{i}_{path.name}")
    return flat


def grid_px(rows: int, cols: int, px: int = PX) -> tuple[int, int]:
    """(width, height) of a grid of rows x cols pictures of px pixels."""
    return cols * (px + PAD_PX) + PAD_PX, rows * (px + PAD_PX) + PAD_PX


def sizes(folder) -> dict:
    return {p.stem: Image.open(p).size for p in sorted(folder.glob("*.png"))}


def test_cli_writes_four_grids_of_rows_by_columns_pictures(run_dir, flat_images, inputs, tmp_path):
    # a flat folder, 3 images: one column per image (masks 2 rows, reconstructions 2, predictions 3),
    # attention one row per image and one column per head
    assert main(["visualize", str(run_dir), "--images", str(flat_images), "--out", str(tmp_path)]) == 0
    assert sizes(tmp_path) == {"masks": grid_px(2, 3), "reconstructions": grid_px(2, 3),
                               "predictions": grid_px(3, 3), "attention": grid_px(3, HEADS)}
    # an ImageFolder, the default 8 images, into RUN/images/visualize
    assert main(["visualize", str(run_dir), "--images", str(inputs[0])]) == 0
    assert sizes(run_dir / "images" / "visualize") == {
        "masks": grid_px(2, 8), "reconstructions": grid_px(2, 8), "predictions": grid_px(3, 8),
        "attention": grid_px(8, HEADS)}


def test_pretraining_evaluation_writes_the_same_pictures(run_dir):
    """Pretraining with held-out images draws the four grids of its first held-out batch (8 images) at the end."""
    assert sizes(run_dir / "images" / "eval") == {
        "masks": grid_px(2, 8), "reconstructions": grid_px(2, 8), "predictions": grid_px(3, 8),
        "attention": grid_px(8, HEADS)}


def tiny_model(fused: bool) -> BeitMIM:
    """A tiny BEiT whose biases (zero at init) are random, so that leaving any out would show."""
    torch.manual_seed(0)
    model = BeitMIM(get_spec(MODEL), vocab_size=16, drop_path=0.0).eval()
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()
        for blk in model.blocks:
            blk.attn.q_bias.normal_()
            blk.attn.v_bias.normal_()
            blk.attn.fused_attn = fused
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_recomputed_attention_equals_the_modules_own_output(fused):
    model = tiny_model(fused)
    images = torch.randn(2, 3, PX, PX)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :20] = mask[1, 30:50] = True
    for m in (None, mask):
        probe = last_block_attention(model, images, m)
        assert probe.weights.shape == (2, HEADS, 65, 65)
        torch.testing.assert_close(probe.weights.sum(-1), torch.ones(2, HEADS, 65))
        torch.testing.assert_close(probe.recomputed, probe.output, atol=1e-5, rtol=0)
    maps = attention_maps(model, images)  # (B, heads, grid, grid): the [CLS] row without its own column
    assert maps.shape == (2, HEADS, 8, 8)
    assert torch.all(maps.sum((-1, -2)) < 1) and torch.all(maps >= 0)


def test_tokenizer_without_decoder_gets_masks_and_attention_only(run_dir, inputs, tmp_path, caplog):
    from beit_scale.data import EvalTwoView, MIMDataset, SafeImageFolder
    from beit_scale.masking import build_mask_generator

    cfg, model, tokenizer = load_run(run_dir)

    class EncoderOnly(torch.nn.Module):  # a DALL-E encoder file's shape: encode, no decode_ids
        def __init__(self):
            super().__init__()
            self.inner = tokenizer
            self.map_pixels = tokenizer.map_pixels
            self.encode = tokenizer.encode

    data = MIMDataset(SafeImageFolder(inputs[0]), EvalTwoView(PX, PX, tokenizer_pixel_map=tokenizer.map_pixels),
                      build_mask_generator("blockwise", (8, 8), 26, 4), 1)
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    model.train()
    with caplog.at_level("INFO", logger="beit_scale.train.visualize"):
        grids = pictures(model, EncoderOnly(), batch, cfg.data.mean, cfg.data.std)
    assert model.training  # the caller's mode comes back
    assert sorted(grids) == ["attention", "masks"]
    assert "tokenizer EncoderOnly has no decoder (decode_ids)" in caplog.text

    class Writer:
        def __init__(self):
            self.added = []

        def add_image(self, tag, image, step):
            self.added.append((tag, tuple(image.shape), step))

    writer = Writer()
    write_pictures(grids, tmp_path, writer, step=7)
    assert writer.added == [("visualize/masks", (3, *grid_px(2, 4)[::-1]), 7),
                            ("visualize/attention", (3, *grid_px(4, HEADS)[::-1]), 7)]


def rewritten_config(run_dir, dest, **run_fields):
    dest.mkdir()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["run"].update(run_fields)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def test_bad_inputs_are_refused_with_the_fix(run_dir, inputs, tmp_path, capsys):
    images = str(inputs[0])
    cases = [
        (tmp_path / "typo", images, "is not a folder"),
        (tmp_path, images, "is not a run folder: it has no config.yaml"),
        (rewritten_config(run_dir, tmp_path / "ft", job="finetune"), images, "is a finetune run .* not a pretraining"),
        (rewritten_config(run_dir, tmp_path / "unfinished"), images,
         "has no model.safetensors .*`beit-scale consolidate"),
        (run_dir, tmp_path / "nowhere", "no such folder"),
        (run_dir, tmp_path, "holds no images"),  # only folders without images
    ]
    for run, pics, message in cases:
        with pytest.raises(ValueError, match=message):
            visualize(run, pics)
    with pytest.raises(ValueError, match="--num 0 must be >= 1"):
        visualize(run_dir, images, num=0)
    assert main(["visualize", str(tmp_path), "--images", images]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_an_unfinished_run_is_shown_from_its_consolidated_checkpoint(run_dir, inputs, tmp_path):
    from beit_scale.checkpoint.tools import consolidate

    unfinished = rewritten_config(run_dir, tmp_path / "unfinished")
    weights = consolidate(run_dir / "checkpoints", tmp_path / "consolidated.safetensors")  # what the refusal says
    paths = visualize(unfinished, inputs[0], num=2, weights=weights)
    assert sorted(paths) == ["attention", "masks", "predictions", "reconstructions"]
    assert all(p.parent == unfinished / "images" / "visualize" for p in paths.values())
    with pytest.raises(ValueError, match="--weights .*typo.safetensors: no such file"):
        visualize(unfinished, inputs[0], weights=tmp_path / "typo.safetensors")
