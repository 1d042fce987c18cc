"""BEiT + UperNet segmentation model: reference shapes, feature blocks, loss, layer ids, sliding windows, weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resize_rel_pos_bias_table
from timm.optim import param_groups_layer_decay
from torch import nn

from beit_scale.models.classifier import build_classifier
from beit_scale.models.segmentation import (BeitSegmenter, feature_indices, segmentation_loss, segmenter_layer_id,
                                            slide_inference, whole_inference, window_boxes)
from beit_scale.models.zoo import BeitSpec, get_spec

# patch 16 like base, small enough for real forwards on the CPU
TINY = BeitSpec(embed_dim=32, depth=4, num_heads=2, mlp_dim=64, patch_size=16, img_size=224, layer_scale=0.1,
                published_params=0)


def _tiny(num_classes: int = 5, img_size: int = 64, **kwargs) -> BeitSegmenter:
    torch.manual_seed(0)
    return BeitSegmenter(TINY, num_classes, img_size=img_size, channels=16, aux_channels=8, **kwargs)


@pytest.mark.parametrize("img_size", [512, 640])
def test_base_pyramid_and_logits_have_the_reference_strides_and_widths(img_size):
    with torch.device("meta"):
        model = BeitSegmenter(get_spec("beit_base_patch16_224"), 150, img_size=img_size)
        images = torch.empty(2, 3, img_size, img_size)
        pyramid = model.pyramid(images)
        logits, aux = model.train()(images)
        eval_logits = model.eval()(images)
    s = img_size
    assert [tuple(f.shape) for f in pyramid] == [(2, 768, s // 4, s // 4), (2, 768, s // 8, s // 8),
                                                 (2, 768, s // 16, s // 16), (2, 768, s // 32, s // 32)]
    assert tuple(logits.shape) == tuple(eval_logits.shape) == (2, 150, s // 4, s // 4)
    assert tuple(aux.shape) == (2, 150, s // 16, s // 16)  # FCN head on the third level
    assert model.decode_head.fpn_bottleneck.conv.in_channels == 4 * 768  # channels=768, as the base config
    assert model.decode_head.conv_seg.in_channels == 768 and model.auxiliary_head.conv_seg.in_channels == 256
    assert [m.output_size for m in (p[0] for p in model.decode_head.psp_modules)] == [1, 2, 3, 6]
    assert model.backbone.blocks[0].attn.window_size == (s // 16, s // 16)
    assert isinstance(model.backbone.norm, nn.Identity) and isinstance(model.backbone.fc_norm, nn.Identity)


def test_feature_blocks_are_the_reference_ones_for_base_and_large_and_distinct_for_small_depths():
    assert feature_indices(12) == [3, 5, 7, 11]
    assert feature_indices(24) == [7, 11, 15, 23]
    assert feature_indices(4) == [0, 1, 2, 3] and feature_indices(5) == [1, 2, 3, 4]
    for depth in range(4, 41):
        ids = feature_indices(depth)
        assert ids == sorted(set(ids)) and len(ids) == 4 and ids[-1] == depth - 1
    with pytest.raises(ValueError, match="depth >= 4"):
        feature_indices(3)
    with torch.device("meta"):
        assert BeitSegmenter(get_spec("beit_large_patch16_224"), 150).out_indices == [7, 11, 15, 23]


def test_segmenter_refuses_other_input_sizes_and_bad_indices():
    model = _tiny()
    with pytest.raises(ValueError, match="slide_inference"):
        model(torch.zeros(1, 3, 96, 64))
    with pytest.raises(ValueError, match="out_indices"):
        _tiny(out_indices=[0, 1, 2])


def test_tiny_forward_shapes_and_loss_backward_reach_every_parameter():
    model = _tiny().train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    logits, aux = model(images)
    assert logits.shape == (2, 5, 16, 16) and aux.shape == (2, 5, 4, 4)
    losses = model.loss(images, labels)
    assert set(losses) == {"loss", "loss_main", "loss_aux"}
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_ignores_255_and_weights_the_auxiliary_head_by_0_4():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 8, 8))
    labels[:, :3] = 255
    logits, aux = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 2, 2)
    out = segmentation_loss((logits, aux), labels)
    changed = logits.clone()
    changed[:, :, :3] = 100.0  # logits of ignored pixels change nothing
    assert torch.equal(segmentation_loss(changed, labels)["loss"], out["loss_main"])

    valid = labels != 255  # mmseg 0.11: the sum over valid pixels divided by all pixels
    manual = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid], reduction="sum") / labels.numel()
    assert torch.allclose(out["loss_main"], manual)
    aux_up = F.interpolate(aux, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out["loss_aux"], segmentation_loss(aux_up, labels)["loss"])
    assert torch.allclose(out["loss"], out["loss_main"] + 0.4 * out["loss_aux"])
    assert segmentation_loss(logits, torch.full((2, 8, 8), 255))["loss"] == 0  # padding alone: 0, not NaN


def test_layer_ids_follow_the_reference_constructor_and_feed_timm_layer_decay():
    model = _tiny()
    num_layers = len(model.blocks)
    for name, _ in model.named_parameters():
        expected = (0 if name in ("backbone.cls_token",) or name.startswith("backbone.patch_embed.") else
                    int(name.split(".")[2]) + 1 if name.startswith("backbone.blocks.") else num_layers + 1)
        assert model.layer_id(name) == expected, name
    assert {model.layer_id(n) for n, _ in model.named_parameters()} == set(range(num_layers + 2))
    for bad in ("backbone.blocks.4.attn.qkv.weight", "neck.weight", "backbone.head.weight"):
        with pytest.raises(ValueError):
            segmenter_layer_id(bad, num_layers)
    assert "backbone.blocks.0.attn.relative_position_bias_table" in model.no_weight_decay()

    class Matcher:  # what engine/layer_decay.py's _LayerIdMatcher would hand timm, reading model.layer_id
        named_parameters = model.named_parameters

        def group_matcher(self, coarse=False):
            return model.layer_id

    groups = param_groups_layer_decay(Matcher(), weight_decay=0.05, layer_decay=0.9,
                                      no_weight_decay_list=sorted(model.no_weight_decay()))
    name_of = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        ids = {model.layer_id(name_of[id(p)]) for p in group["params"]}
        assert len(ids) == 1 and group["lr_scale"] == pytest.approx(0.9 ** (num_layers + 1 - ids.pop()))


def test_window_boxes_are_mmseg_slide_windows():
    assert window_boxes(10, 10, 6, 4) == [(0, 6, 0, 6), (0, 6, 4, 10), (4, 10, 0, 6), (4, 10, 4, 10)]
    assert window_boxes(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert window_boxes(5, 7, 8, 4) == [(0, 5, 0, 7)]  # smaller than the crop: one (padded) window
    with pytest.raises(ValueError, match="stride <= crop"):
        window_boxes(10, 10, 4, 5)


def test_slide_inference_averages_overlapping_windows():
    calls = []

    def window_index(x):  # each window's logits are its call number, 1, 2, 3, 4
        calls.append(tuple(x.shape))
        return torch.full((x.shape[0], 1, x.shape[2], x.shape[3]), float(len(calls)))

    out = slide_inference(window_index, torch.zeros(1, 3, 10, 10), num_classes=1, crop=6, stride=4)
    assert calls == [(1, 3, 6, 6)] * 4
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 0, 5] == 1.5 and out[0, 0, 5, 5] == 2.5 and out[0, 0, 9, 9] == 4
    assert out[0, 0, 5, 0] == 2 and out[0, 0, 9, 5] == 3.5


def test_slide_inference_of_a_pointwise_model_equals_the_model_on_large_and_small_images():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)

    def fixed_size(x):  # like BEiT: only crop-sized inputs
        assert x.shape[-2:] == (8, 8)
        return conv(x)

    with torch.no_grad():
        for h, w in ((21, 30), (5, 7)):
            images = torch.randn(2, 3, h, w)
            out = slide_inference(fixed_size, images, num_classes=4, crop=8, stride=5)
            assert out.shape == (2, 4, h, w) and torch.allclose(out, conv(images), atol=1e-6)
        assert slide_inference(fixed_size, images, 4, 8, 5, out_size=(10, 14)).shape == (2, 4, 10, 14)


def test_slide_inference_with_one_window_equals_whole_inference():
    model = _tiny().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = whole_inference(model, images)
        slide = slide_inference(model, images, num_classes=5, crop=64, stride=43)
    assert whole.shape == (2, 5, 64, 64) and torch.equal(slide, whole)


def test_backbone_loads_224_px_weights_into_a_512_px_model_with_interpolated_tables():
    classifier = build_classifier(TINY, num_classes=7, img_size=224)
    with torch.no_grad():
        for blk in classifier.blocks:
            blk.attn.relative_position_bias_table.normal_()
    sd = classifier.state_dict()
    model = _tiny(img_size=512)
    model.load_backbone(sd)  # strict: raises on any missing or unexpected key
    table = sd["blocks.2.attn.relative_position_bias_table"]  # (27 * 27 + 3, heads)
    loaded = model.backbone.blocks[2].attn.relative_position_bias_table
    assert table.shape == (27 * 27 + 3, 2) and loaded.shape == (63 * 63 + 3, 2)
    expected = resize_rel_pos_bias_table(table, new_window_size=(32, 32), new_bias_shape=(63 * 63 + 3, 2))
    assert torch.equal(loaded.detach(), expected)
    assert torch.equal(loaded.detach()[-3:], table[-3:])  # the [CLS] entries are kept
    assert torch.equal(model.backbone.blocks[3].mlp.fc2.weight, sd["blocks.3.mlp.fc2.weight"])
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 512, 512)).shape == (1, 5, 128, 128)
