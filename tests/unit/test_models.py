"""Model zoo and the MIM model: published sizes, the paper's init, and what [M] hides."""
import math

import pytest
import torch

from beit_scale.models import ZOO, BeitMIM, backbone_param_count, get_spec

# Exact backbone counts (shared relative position bias, no MIM head, no [M]) and the paper's figures.
PINNED = {
    "beit_tiny_patch4_32": 453_420,
    "beit_tiny_patch8_64": 467_244,
    "beit_tiny_patch16_224": 5_491_092,
    "beit_base_patch16_224": 85_665_360,
    "beit_large_patch16_224": 303_136_192,
    "beit_giant_patch14_224": 1_010_912_320,
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_parameter_counts_match_published_figures(name):
    spec = ZOO[name]
    with torch.device("meta"):
        model = BeitMIM(spec, vocab_size=8192)
    count = backbone_param_count(model)
    assert count == PINNED[name]
    assert abs(count - spec.published_params) / spec.published_params < 0.015  # 86M, 304M, 1.0B
    head = spec.embed_dim * 8192 + 8192 + spec.embed_dim  # lm_head + [M]
    assert sum(p.numel() for p in model.parameters()) == count + head


def test_zoo_shapes_are_the_papers():
    assert [(s.embed_dim, s.depth, s.num_heads, s.mlp_dim, s.patch_size) for s in
            (ZOO["beit_base_patch16_224"], ZOO["beit_large_patch16_224"], ZOO["beit_giant_patch14_224"])] == [
        (768, 12, 12, 3072, 16), (1024, 24, 16, 4096, 16), (1408, 40, 16, 6144, 14)]
    with torch.device("meta"):
        giant = BeitMIM(ZOO["beit_giant_patch14_224"], 8192)
    assert giant.blocks[0].mlp.fc1.out_features == 6144
    assert giant.grid_size == (16, 16)
    with pytest.raises(ValueError, match="choose one of"):
        get_spec("beit_huge_patch14_224")


def test_init_follows_the_paper():
    torch.manual_seed(0)
    spec = ZOO["beit_tiny_patch16_224"]  # 12 blocks of width 192
    model = BeitMIM(spec, vocab_size=512, drop_path=0.1)
    for layer, blk in enumerate(model.blocks, start=1):
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            expected = 0.02 / math.sqrt(2 * layer)  # trunc-normal(0.02), divided by sqrt(2l)
            assert w.std().item() == pytest.approx(expected, rel=0.06)
        assert blk.mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.06)
        assert torch.all(blk.gamma_1 == 0.1) and torch.all(blk.gamma_2 == 0.1)  # base layer scale
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.06)
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.3)
    drop = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0 for blk in model.blocks]
    assert drop[0] == 0.0 and drop[-1] == pytest.approx(0.1)  # stochastic depth, linear in depth
    with torch.device("meta"):
        large = BeitMIM(ZOO["beit_large_patch16_224"], 16)
    assert all(blk.init_values == 1e-5 for blk in large.blocks)  # large and giant start at 1e-5


def test_masked_patches_are_hidden_and_only_they_are_predicted():
    torch.manual_seed(0)
    model = BeitMIM(ZOO["beit_tiny_patch4_32"], vocab_size=64, drop_path=0.0).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :10] = True  # first 10 patches (rows 0-1 of the 8x8 grid) of image 0
    mask[1, 30:33] = True
    logits = model(images, mask)
    assert logits.shape == (13, 64)
    changed = images.clone()
    changed[0, :, :4, :] = torch.randn(3, 4, 32)  # pixels of patches 0-7 only, all masked
    assert torch.equal(model(changed, mask), logits)  # the [M] embedding replaced them entirely
    changed[0, :, 30:, :] += 1.0  # visible patches of image 0 do change the predictions
    assert not torch.allclose(model(changed, mask)[:10], logits[:10])


def test_no_weight_decay_covers_tokens_and_position_tables():
    model = BeitMIM(ZOO["beit_tiny_patch4_32"], vocab_size=16)
    skip = model.no_weight_decay()
    assert {"cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table"} <= skip
