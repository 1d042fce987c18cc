"""Fine-tuning models: the classifier is timm's BEiT, and pretraining checkpoints convert into it and into timm."""
import logging

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import resize_rel_pos_bias_table
from timm.models.beit import Beit, checkpoint_filter_fn

from beit_scale.models import ZOO, BeitMIM
from beit_scale.models.classifier import build_classifier
from beit_scale.models.convert import (
    NON_PERSISTENT_BUFFERS,
    from_timm_state_dict,
    mim_to_classifier_state_dict,
    mim_to_timm_backbone,
    to_timm_state_dict,
)

TINY = ZOO["beit_tiny_patch4_32"]  # width 96, 4 blocks, 3 heads, 8x8 window at 32 px
# timm's own registry entry, shrunk to the tiny zoo shape (the kwargs override its model_args)
TINY_TIMM = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)
MIM_ONLY = ["mask_token", "norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"]
# torch deprecation notices raised inside timm's table interpolation; nothing to act on here
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:timm.layers.interpolate"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def mim():
    torch.manual_seed(0)
    model = BeitMIM(TINY, vocab_size=16, drop_path=0.0).eval()
    with torch.no_grad():  # timm starts the table at zero; make it distinguishable
        model.rel_pos_bias.relative_position_bias_table.normal_()
        model.norm.weight.normal_()
    return model


def encoder_tokens(mim: BeitMIM, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(before, after) the pretraining final norm: (B, 1+N, D) each, nothing masked."""
    seen = {}
    handle = mim.norm.register_forward_hook(lambda m, args, out: seen.update(pre=args[0], post=out))
    with torch.no_grad():
        mim(images, torch.zeros(images.shape[0], mim.patch_embed.num_patches, dtype=torch.bool))
    handle.remove()
    return seen["pre"], seen["post"]


def test_classifier_is_timms_beit_configured_as_beit_finetunes():
    torch.manual_seed(0)
    model = build_classifier(TINY, num_classes=1000)
    assert type(model) is Beit and model.global_pool == "avg"
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.LayerNorm)
    assert model.pos_embed is None and model.rel_pos_bias is None
    assert all(blk.attn.relative_position_bias_table.shape == (15 * 15 + 3, 3) for blk in model.blocks)
    assert all(torch.all(blk.gamma_1 == 0.1) for blk in model.blocks)
    assert model.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.05)  # head_init_scale
    with torch.device("meta"):
        large = build_classifier(ZOO["beit_large_patch16_224"], 10, img_size=384)
        base = build_classifier(ZOO["beit_base_patch16_224"], 10, layer_scale=1e-5)
    assert large.blocks[0].init_values == 1e-5 and large.patch_embed.grid_size == (24, 24)
    assert base.blocks[0].init_values == 1e-5 and base.blocks[0].mlp.fc1.out_features == 3072


@pytest.mark.parametrize("name, timm_name", [("beit_base_patch16_224", "beit_base_patch16_224"),
                                             ("beit_large_patch16_224", "beit_large_patch16_224")])
def test_classifier_is_module_for_module_timms_and_loads_strictly_both_ways(name, timm_name):
    with torch.device("meta"):
        ours = build_classifier(ZOO[name], num_classes=10, drop_path=0.1)
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=10, drop_path_rate=0.1)
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True)
    ours.load_state_dict(from_timm_state_dict(theirs.state_dict()), strict=True)


def test_non_persistent_buffers_are_exactly_the_ones_timm_rebuilds():
    with torch.device("meta"):
        model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=10)
    not_saved = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    assert {n.rsplit(".", 1)[-1] for n in not_saved} == set(NON_PERSISTENT_BUFFERS)
    assert len(not_saved) == 2 * 12


@pytest.fixture
def tiny_pair():
    """Our tiny classifier and timm's ``beit_base_patch16_224`` entry shrunk to the same shape, really built."""
    torch.manual_seed(0)
    ours = build_classifier(TINY, num_classes=10, drop_path=0.0).eval()
    theirs = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=10, **TINY_TIMM).eval()
    assert repr(ours) == repr(theirs)
    return ours, theirs


def test_timm_weights_give_identical_logits_in_our_classifier(tiny_pair):
    ours, theirs = tiny_pair
    images = torch.randn(2, 3, 32, 32)
    # as the reference release stores it: wrapped, with the index buffers saved
    sd = {**theirs.state_dict(), **{f"blocks.{i}.attn.relative_position_index": blk.attn.relative_position_index
                                    for i, blk in enumerate(theirs.blocks)}}
    ours.load_state_dict(from_timm_state_dict({"model": sd}), strict=True)
    with torch.no_grad():
        assert torch.equal(ours(images), theirs(images))


def test_our_weights_give_identical_logits_in_timm(tiny_pair):
    ours, theirs = tiny_pair
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        theirs.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True)
        assert torch.equal(theirs(images), ours(images))


def test_to_timm_refuses_a_pretraining_state_dict(mim):
    with pytest.raises(ValueError, match="mim_to_timm_backbone"):
        to_timm_state_dict(mim.state_dict())


def test_mim_checkpoint_copies_the_shared_table_into_every_block(mim, caplog, tmp_path):
    torch.manual_seed(1)
    clf = build_classifier(TINY, num_classes=10)
    head, fc_norm = clf.head.weight.clone(), clf.fc_norm.weight.clone()
    with caplog.at_level(logging.INFO, logger="beit_scale.models.convert"):
        sd = mim_to_classifier_state_dict(mim.state_dict(), clf)
    clf.load_state_dict(sd, strict=True)
    shared = mim.rel_pos_bias.relative_position_bias_table
    for blk in clf.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, shared)
    assert torch.equal(clf.blocks[3].mlp.fc2.weight, mim.blocks[3].mlp.fc2.weight)
    assert torch.equal(clf.head.weight, head) and torch.equal(clf.fc_norm.weight, fc_norm)  # left at init
    assert str(MIM_ONLY) in caplog.text
    assert "initialisation: ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']" in caplog.text
    save_file(sd, str(tmp_path / "ft.safetensors"))  # no shared storage between the copied tables
    assert load_file(str(tmp_path / "ft.safetensors")).keys() == sd.keys()


def test_converted_classifier_computes_the_pretrained_encoder(mim):
    clf = build_classifier(TINY, num_classes=10).eval()
    clf.load_state_dict(mim_to_classifier_state_dict(mim.state_dict(), clf), strict=True)
    images = torch.randn(2, 3, 32, 32)
    pre_norm, _ = encoder_tokens(mim, images)
    with torch.no_grad():
        torch.testing.assert_close(clf.forward_features(images), pre_norm)  # norm is an Identity, fc_norm comes after


def test_unexpected_or_missing_keys_and_shape_mismatches_are_errors_naming_them(mim):
    clf = build_classifier(TINY, num_classes=10)
    sd = mim.state_dict()
    with pytest.raises(ValueError, match=r"checkpoint does not match model: missing \[\], unexpected \['decoder.w'\]"):
        mim_to_classifier_state_dict({**sd, "decoder.w": torch.zeros(1)}, clf)
    missing = {k: v for k, v in sd.items() if k != "blocks.2.mlp.fc1.bias"}
    with pytest.raises(ValueError, match=r"missing \['blocks.2.mlp.fc1.bias'\], unexpected \[\]$"):
        mim_to_classifier_state_dict(missing, clf)
    with pytest.raises(ValueError, match=r"shape mismatch \['blocks.0.mlp.fc1.weight: checkpoint \(10, 96\) vs model "
                                         r"\(384, 96\)'\]"):
        mim_to_classifier_state_dict({**sd, "blocks.0.mlp.fc1.weight": torch.zeros(10, 96)}, clf)
    with torch.device("meta"):
        wider = build_classifier(ZOO["beit_tiny_patch16_224"], num_classes=10, img_size=32)
    with pytest.raises(ValueError, match="patch_embed.proj.weight: checkpoint"):
        mim_to_classifier_state_dict(sd, wider)


def test_window_8_to_16_interpolates_the_table_and_keeps_its_centre(mim, caplog):
    clf = build_classifier(TINY, num_classes=10, img_size=64).eval()  # 16x16 patches
    with caplog.at_level(logging.INFO, logger="beit_scale.models.convert"):
        sd = mim_to_classifier_state_dict(mim.state_dict(), clf)
    clf.load_state_dict(sd, strict=True)
    shared = mim.rel_pos_bias.relative_position_bias_table.detach()  # (15*15 + 3, 3)
    table = clf.blocks[0].attn.relative_position_bias_table.detach()
    assert table.shape == (31 * 31 + 3, 3)
    assert torch.equal(table, resize_rel_pos_bias_table(shared, (16, 16), (31 * 31 + 3, 3)))
    assert all(torch.equal(blk.attn.relative_position_bias_table, table) for blk in clf.blocks)
    src, dst = shared[:-3].view(15, 15, 3), table[:-3].view(31, 31, 3)
    assert torch.equal(dst[15, 15], src[7, 7])  # offset (0, 0)
    torch.testing.assert_close(dst[14:17, 14:17], src[6:9, 6:9])  # offsets -1..1 are interpolation nodes
    assert torch.equal(table[-3:], shared[-3:])  # [CLS] entries kept
    assert "resized to (964, 3) for window (16, 16)" in caplog.text
    assert clf(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_classifier_checkpoint_with_other_classes_drops_only_the_head(caplog):
    torch.manual_seed(0)
    ft22k = build_classifier(TINY, num_classes=20)
    with torch.no_grad():
        ft22k.fc_norm.weight.normal_()
        for blk in ft22k.blocks:
            blk.attn.relative_position_bias_table.normal_()
    ft1k = build_classifier(TINY, num_classes=10)
    head = ft1k.head.weight.clone()
    with caplog.at_level(logging.INFO, logger="beit_scale.models.convert"):
        sd = mim_to_classifier_state_dict(ft22k.state_dict(), ft1k)
    ft1k.load_state_dict(sd, strict=True)
    assert torch.equal(ft1k.head.weight, head)
    assert torch.equal(ft1k.fc_norm.weight, ft22k.fc_norm.weight)  # intermediate fine-tuning keeps fc_norm
    table = ft22k.blocks[2].attn.relative_position_bias_table
    assert torch.equal(ft1k.blocks[2].attn.relative_position_bias_table, table)
    assert "head dropped" in caplog.text and "head.weight (20, 96) vs model (10, 96)" in caplog.text
    same = build_classifier(TINY, num_classes=20)
    same.load_state_dict(mim_to_classifier_state_dict(ft22k.state_dict(), same), strict=True)
    assert torch.equal(same.head.weight, ft22k.head.weight)
    with torch.device("meta"):
        at_64 = build_classifier(TINY, num_classes=20, img_size=64)  # each block's own table resized
    sd = mim_to_classifier_state_dict(ft22k.state_dict(), at_64)
    for i, blk in enumerate(ft22k.blocks):
        expected = resize_rel_pos_bias_table(blk.attn.relative_position_bias_table.detach(), (16, 16), (964, 3))
        assert torch.equal(sd[f"blocks.{i}.attn.relative_position_bias_table"], expected)


@pytest.mark.parametrize("name, img_size", [("beit_base_patch16_224", 384), ("beit_large_patch16_224", 224),
                                            ("beit_giant_patch14_224", 224)])
def test_mim_checkpoints_of_the_zoo_fit_their_classifiers(name, img_size):
    with torch.device("meta"):
        mim = BeitMIM(ZOO[name], vocab_size=8192)
        clf = build_classifier(ZOO[name], num_classes=1000, img_size=img_size)
    clf.load_state_dict(mim_to_classifier_state_dict(mim.state_dict(), clf), strict=True, assign=True)


def test_mim_backbone_loads_strictly_into_timms_headless_model():
    spec = ZOO["beit_base_patch16_224"]
    with torch.device("meta"):
        mim = BeitMIM(spec, vocab_size=8192)
        avg = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0)
        tokens = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, global_pool="")
    sd = mim_to_timm_backbone(mim.state_dict(), spec)
    avg.load_state_dict(sd, strict=True, assign=True)
    filtered = checkpoint_filter_fn(sd, avg)  # what timm applies to pretrained files: nothing left to do
    assert filtered.keys() == sd.keys() and all(filtered[k] is sd[k] for k in sd)
    tokens.load_state_dict(mim_to_timm_backbone(mim.state_dict(), spec, global_pool=""), strict=True, assign=True)


def test_mim_backbone_in_timm_keeps_the_encoder_and_starts_a_fresh_fc_norm(mim):
    images = torch.randn(2, 3, 32, 32)
    pre_norm, post_norm = encoder_tokens(mim, images)
    avg = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **TINY_TIMM).eval()
    avg.load_state_dict(mim_to_timm_backbone(mim.state_dict(), TINY), strict=True)
    tokens = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, global_pool="",
                               **TINY_TIMM).eval()
    tokens.load_state_dict(mim_to_timm_backbone(mim.state_dict(), TINY, global_pool=""), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(tokens.forward_features(images), post_norm)  # pretraining norm kept
        torch.testing.assert_close(avg(images), F.layer_norm(pre_norm[:, 1:].mean(1), (96,), eps=1e-6))
    with pytest.raises(ValueError, match="global_pool='token'"):
        mim_to_timm_backbone(mim.state_dict(), TINY, global_pool="token")


def test_a_relative_position_table_of_the_wrong_rank_is_a_message(mim):
    sd = mim.state_dict()
    sd["rel_pos_bias.relative_position_bias_table"] = sd["rel_pos_bias.relative_position_bias_table"].flatten()
    clf = build_classifier(TINY, num_classes=10, img_size=64)
    with pytest.raises(ValueError, match=r"has shape \(684,\); a relative position table is \(positions, heads\)"):
        mim_to_classifier_state_dict(sd, clf)
