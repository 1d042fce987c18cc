"""The linear-probe model: timm's pruned BEiT gives the same features as running the first blocks by hand."""
import copy

import pytest
import torch
import torch.nn.functional as F
import timm.models.beit as timm_beit
from timm.models.beit import Beit

from beit_scale.models import LinearProbe, build_classifier, classifier_kwargs, get_spec
from beit_scale.models.probe import average_norm_stats

SPEC = get_spec("beit_tiny_patch4_32")  # width 96, 4 blocks, 3 heads, 8x8 patches at 32 px
NUM_CLASSES = 10
# torch deprecation notices raised inside timm's table interpolation; nothing to act on here
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:timm.layers.interpolate"),
              pytest.mark.usefixtures("one_thread")]


def make_backbone(variant: str = "classifier", drop_path: float = 0.0) -> Beit:
    """A tiny backbone as the probe job builds it (or with a shared bias and absolute positions), random tables."""
    torch.manual_seed(0)
    if variant == "classifier":
        model = build_classifier(SPEC, 0, SPEC.img_size, drop_path=drop_path, layer_scale=0.1)
    else:  # the other position schemes timm's Beit supports, so the reference covers both of its branches
        model = Beit(**{**classifier_kwargs(SPEC, 0, SPEC.img_size, drop_path, 0.1), "use_abs_pos_emb": True,
                        "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True})
    with torch.no_grad():  # timm starts the bias tables at zero; make them matter
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()
    return model.eval()


def reference_features(model: Beit, images: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """(B, D) mean patch token after ``num_blocks`` blocks of an unpruned backbone, written out by hand."""
    x = model.patch_embed(images)  # (B, N, D)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)  # (B, 1+N, D)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None  # (heads, 1+N, 1+N)
    for blk in model.blocks[:num_blocks]:
        x = blk(x, shared_rel_pos_bias=shared)
    return x[:, 1:].mean(1)  # no final norm


def images(batch: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, SPEC.img_size, SPEC.img_size, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("variant", ["classifier", "shared_bias_abs_pos"])
@pytest.mark.parametrize("num_blocks", [1, SPEC.depth])
def test_features_equal_handwritten_forward_of_unpruned_backbone(variant, num_blocks):
    backbone = make_backbone(variant)
    reference = copy.deepcopy(backbone)
    probe = LinearProbe(backbone, num_blocks, NUM_CLASSES)
    x = images()
    with torch.no_grad():
        want = reference_features(reference, x, num_blocks)
    got = probe.features(x)
    assert got.shape == (4, SPEC.embed_dim)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    if num_blocks < SPEC.depth:  # block num_blocks+1 changes the tokens, so the cut really is where asked
        with torch.no_grad():
            assert not torch.allclose(reference_features(reference, x, num_blocks + 1), want, atol=1e-3)


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_pruned_backbone_is_frozen_and_only_the_head_gets_gradients(num_blocks):
    backbone = make_backbone()
    full_keys = set(backbone.state_dict())
    probe = LinearProbe(backbone, num_blocks, NUM_CLASSES)
    assert len(probe.backbone.blocks) == num_blocks
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}

    # state dict: the probe job saves norm.* and head.*; the backbone keeps the kept blocks' keys only
    keys = set(probe.state_dict())
    assert {k for k in keys if not k.startswith("backbone.")} == {
        "norm.running_mean", "norm.running_var", "norm.num_batches_tracked", "head.weight", "head.bias"}
    kept = {k for k in full_keys if not (k.startswith(("fc_norm.", "head.", "norm."))
                                         or (k.startswith("blocks.") and int(k.split(".")[1]) >= num_blocks))}
    assert {k.removeprefix("backbone.") for k in keys if k.startswith("backbone.")} == kept

    # init: zero bias, trunc-normal(0.01) weight
    assert torch.equal(probe.head.bias, torch.zeros(NUM_CLASSES))
    assert 0.008 < probe.head.weight.std().item() < 0.012

    probe.train()
    F.cross_entropy(probe(images()), torch.arange(4)).backward()
    assert probe.head.weight.grad is not None and probe.head.weight.grad.abs().sum() > 0
    assert probe.head.bias.grad is not None
    assert all(p.grad is None for p in probe.backbone.parameters())


def test_grad_checkpointing_gives_the_same_logits(monkeypatch):
    probe = LinearProbe(make_backbone(), 3, NUM_CLASSES).train()
    x = images()
    plain = probe(x)
    calls = []
    real = timm_beit.checkpoint
    monkeypatch.setattr(timm_beit, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    probe.backbone.set_grad_checkpointing(True)
    checkpointed = probe(x)
    assert len(calls) == 3  # every kept block went through checkpointing, no pruned one
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-6)


def test_layernorm_probe_normalises_features_without_affine():
    backbone = make_backbone()
    reference = copy.deepcopy(backbone)
    probe = LinearProbe(backbone, 2, NUM_CLASSES, norm="layernorm")
    assert not any(k.startswith("norm.") for k in probe.state_dict())  # nothing to save but the head
    x = images()
    with torch.no_grad():
        feats = reference_features(reference, x, 2)
        want = F.linear(F.layer_norm(feats, (SPEC.embed_dim,), eps=1e-6), probe.head.weight, probe.head.bias)
    torch.testing.assert_close(probe.train()(x), want, atol=1e-6, rtol=1e-6)


def test_train_mode_keeps_the_backbone_in_eval_so_drop_path_never_fires():
    probe = LinearProbe(make_backbone(drop_path=0.5), SPEC.depth, NUM_CLASSES, norm="layernorm")
    probe.train()
    assert probe.training and probe.norm.training and probe.head.training
    assert not any(m.training for m in probe.backbone.modules())
    x = images()
    torch.testing.assert_close(probe.features(x), probe.features(x), atol=0, rtol=0)  # no random drop
    probe.eval()
    assert not probe.training and not probe.norm.training


def test_bf16_backbone_runs_and_matches_fp32():
    backbone = make_backbone()
    reference = copy.deepcopy(backbone)
    probe = LinearProbe(backbone, 2, NUM_CLASSES).to(torch.bfloat16).eval()
    feats = probe.features(images(dtype=torch.bfloat16))
    logits = probe(images(dtype=torch.bfloat16))
    assert feats.dtype == logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    with torch.no_grad():
        want = reference_features(reference, images(), 2)
    assert ((feats.float() - want).norm() / want.norm()).item() < 0.02  # bf16 rounding: about 0.5 % here


@pytest.mark.parametrize("num_blocks", [0, SPEC.depth + 1])
def test_num_blocks_outside_the_backbone_is_a_value_error(num_blocks):
    with pytest.raises(ValueError, match=rf"num_blocks={num_blocks} must be in \[1, {SPEC.depth}\]"):
        LinearProbe(make_backbone(), num_blocks, NUM_CLASSES)


def test_unknown_norm_is_a_value_error():
    with pytest.raises(ValueError, match="norm='groupnorm'"):
        LinearProbe(make_backbone(), 1, NUM_CLASSES, norm="groupnorm")


def test_average_norm_stats_is_a_noop_without_a_process_group():
    probe = LinearProbe(make_backbone(), 1, NUM_CLASSES).train()
    probe(images())  # move the running statistics off their init
    before = {k: v.clone() for k, v in probe.norm.state_dict().items()}
    average_norm_stats(probe)
    assert all(torch.equal(v, before[k]) for k, v in probe.norm.state_dict().items())
