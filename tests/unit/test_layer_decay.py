"""Layer-wise lr decay: the layer id of every parameter of each zoo classifier, the groups, scales and decay."""
import pytest
import torch
from timm.models import group_parameters
from timm.scheduler import CosineLRScheduler

from beit_scale.engine.layer_decay import (
    format_group_table,
    layer_decay_param_groups,
    layer_id_of,
    param_names_per_group,
)
from beit_scale.models import ZOO, BeitMIM
from beit_scale.models.classifier import build_classifier

SIZES = ["beit_base_patch16_224", "beit_large_patch16_224", "beit_giant_patch14_224"]
DECAY = 0.65

# The rule table. Every classifier parameter is one of these, nothing else.
LAYER_0 = {"cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
LAYER_TOP = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}  # layer L+1
BLOCK_DECAY = {"attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}  # blocks.{i}. -> i+1
BLOCK_NO_DECAY = {
    "gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
    "attn.q_bias", "attn.v_bias", "attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias",
    "attn.relative_position_bias_table",
}
NO_DECAY = {"cls_token", "patch_embed.proj.bias", "fc_norm.weight", "fc_norm.bias", "head.bias"}


def rule_layer(name: str, num_layers: int) -> int:
    if name in LAYER_0:
        return 0
    if name in LAYER_TOP:
        return num_layers + 1
    prefix, block, rest = name.split(".", 2)
    assert prefix == "blocks" and rest in BLOCK_DECAY | BLOCK_NO_DECAY, name
    return int(block) + 1


def rule_decays(name: str) -> bool:
    return name not in NO_DECAY and name.split(".", 2)[-1] not in BLOCK_NO_DECAY


@pytest.fixture(scope="module", params=SIZES)
def classifier(request):
    with torch.device("meta"):
        return build_classifier(ZOO[request.param], num_classes=1000)


def test_every_parameter_of_each_zoo_classifier_has_the_rule_tables_layer_id(classifier):
    num_layers = len(classifier.blocks)
    names = [n for n, _ in classifier.named_parameters()]
    expected_names = LAYER_0 | LAYER_TOP | {
        f"blocks.{i}.{rest}" for i in range(num_layers) for rest in BLOCK_DECAY | BLOCK_NO_DECAY}
    assert sorted(names) == sorted(expected_names)
    for name in names:
        assert layer_id_of(name, num_layers) == rule_layer(name, num_layers), name


def test_timms_group_matcher_gives_the_same_ids_for_classifiers(classifier):
    # timm's own grouping (unmatched fc_norm/head after the last block) agrees with ours on the classifier
    num_layers = len(classifier.blocks)
    timm_ids = group_parameters(classifier, classifier.group_matcher(), reverse=True)
    for name, _ in classifier.named_parameters():
        assert timm_ids[name] == layer_id_of(name, num_layers), name


def test_groups_by_layer_and_decay_with_exact_scales(classifier):
    num_layers = len(classifier.blocks)
    groups = layer_decay_param_groups(classifier, weight_decay=0.05, layer_decay=DECAY)
    assert len(groups) == 2 * (num_layers + 2)  # 28 base, 52 large, 84 giant
    assert [(g["layer_id"], g["weight_decay"]) for g in groups] == [
        (layer, wd) for layer in range(num_layers + 2) for wd in (0.0, 0.05)]
    for group, names in zip(groups, param_names_per_group(classifier, groups)):
        assert set(group) == {"params", "weight_decay", "lr_scale", "layer_id"}  # no names for the optimizer
        assert type(group["layer_id"]) is int
        assert group["lr_scale"] == DECAY ** (num_layers + 1 - group["layer_id"])
        assert {rule_layer(n, num_layers) for n in names} == {group["layer_id"]}
        assert {rule_decays(n) for n in names} == {group["weight_decay"] == 0.05}
    assert groups[-1]["lr_scale"] == 1.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in classifier.parameters())  # each parameter in exactly one group


def test_no_decay_exactly_on_biases_norms_tokens_and_position_tables(classifier):
    groups = layer_decay_param_groups(classifier, weight_decay=0.05, layer_decay=DECAY)
    decayed = {n for g, names in zip(groups, param_names_per_group(classifier, groups))
               for n in names if g["weight_decay"] > 0}
    for name, p in classifier.named_parameters():
        generic = p.ndim >= 2 and name != "cls_token" and not name.endswith("relative_position_bias_table")
        assert (name in decayed) == generic == rule_decays(name), name


def test_mim_model_ids_put_mask_token_and_shared_table_first_and_heads_last():
    torch.manual_seed(0)
    model = BeitMIM(ZOO["beit_tiny_patch4_32"], vocab_size=16)
    num_layers = len(model.blocks)  # 4
    for name in ("mask_token", "cls_token", "rel_pos_bias.relative_position_bias_table", "patch_embed.proj.weight"):
        assert layer_id_of(name, num_layers) == 0
    for name in ("norm.weight", "norm.bias", "lm_head.weight", "lm_head.bias"):
        assert layer_id_of(name, num_layers) == num_layers + 1
    # timm's own matcher puts [M] with the head and the final norm with the last block: why ids come from layer_id_of
    timm_ids = group_parameters(model, model.group_matcher(), reverse=True)
    assert (timm_ids["mask_token"], timm_ids["norm.weight"]) == (num_layers + 1, num_layers)
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.75)
    assert len(groups) == 2 * (num_layers + 2)
    by_name = {n: g for g, names in zip(groups, param_names_per_group(model, groups)) for n in names}
    assert by_name["mask_token"]["layer_id"] == 0 and by_name["mask_token"]["weight_decay"] == 0.0
    assert by_name["lm_head.weight"]["lr_scale"] == 1.0 and by_name["lm_head.weight"]["weight_decay"] == 0.05
    assert by_name["rel_pos_bias.relative_position_bias_table"]["lr_scale"] == 0.75 ** 5


def test_layer_id_of_rejects_names_outside_the_layout():
    with pytest.raises(ValueError, match="'decoder.weight' has no BEiT layer id"):
        layer_id_of("decoder.weight", 12)
    with pytest.raises(ValueError, match="block 12 but the model has 12 blocks"):
        layer_id_of("blocks.12.mlp.fc1.weight", 12)
    assert layer_id_of("blocks.11.mlp.fc1.weight", 12) == 12
    assert layer_id_of("fc_norm.weight", 12) == 13


def test_impossible_decay_values_are_errors():
    model = build_classifier(ZOO["beit_tiny_patch4_32"], num_classes=10)
    with pytest.raises(ValueError, match=r"layer_decay=1.5 must be in \(0, 1\]"):
        layer_decay_param_groups(model, weight_decay=0.05, layer_decay=1.5)
    with pytest.raises(ValueError, match="weight_decay=-0.1 >= 0"):
        layer_decay_param_groups(model, weight_decay=-0.1, layer_decay=0.65)


def test_groups_drive_adamw_and_the_schedule_multiplies_lr_scale():
    torch.manual_seed(0)
    model = build_classifier(ZOO["beit_tiny_patch4_32"], num_classes=10)
    model.patch_embed.proj.weight.requires_grad_(False)
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=DECAY)
    assert all(p.requires_grad for g in groups for p in g["params"])  # frozen ones are left out
    assert len(groups) == 2 * (4 + 2) - 1  # layer 0 keeps only its no-decay group
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = CosineLRScheduler(opt, t_initial=10, warmup_t=0, t_in_epochs=False)
    sched.step_update(0)
    assert [g["lr"] for g in opt.param_groups] == [1e-3 * g["lr_scale"] for g in opt.param_groups]


def test_group_table_lists_each_group_and_the_totals():
    with torch.device("meta"):
        model = build_classifier(ZOO["beit_base_patch16_224"], num_classes=1000)
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=DECAY)
    table = format_group_table(groups, param_names_per_group(model, groups))
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["layer", "lr", "scale", "weight", "decay", "tensors"]
    assert len(lines) == 2 + len(groups) + 1
    assert lines[2].split()[:4] == ["0", f"{DECAY ** 13:.4g}", "0", "2"] and lines[2].endswith("cls_token")
    total = sum(p.numel() for p in model.parameters())
    assert lines[-1].split() == ["all", str(sum(len(g["params"]) for g in groups)), f"{total:,}"]
    with pytest.raises(ValueError, match="28 groups but 1 name lists"):
        format_group_table(groups, [[]])
