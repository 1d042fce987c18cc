"""masking.target=pixels, the paper's "recover masked pixels" ablation: the head, the per-patch normalised target
(MAE's norm_pix_loss) against a computation by hand, a loss that learns, the config checks, and weights that
fine-tuning and the timm export accept."""
import statistics

import pytest
import torch
from torch import nn

from beit_scale.checks import validate
from beit_scale.config import load_config
from beit_scale.models import (ZOO, BeitMIM, backbone_param_count, build_classifier, mim_to_classifier_state_dict,
                               to_timm_state_dict)
from beit_scale.models.mim import normalized_patch_pixels, patchify
from beit_scale.train.pretrain import mim_forward

TINY = ZOO["beit_tiny_patch4_32"]  # 8x8 patches of 4 px, width 96


def _batch(num_images: int = 4, seed: int = 0, num_masked: int = 20) -> dict:
    """Smooth images (a plane wave per channel: a masked patch is predictable from its neighbours), random masks."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(num_images, 64, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(64, generator=g)[:num_masked]] = True
    u = torch.linspace(0, 1, 32)
    freq, phase = torch.rand(2, num_images, 3, 1, 1, generator=g) * torch.tensor([12.0, 6.28]).view(2, 1, 1, 1, 1)
    image = torch.sin(freq * (u.view(1, 1, 32, 1) + u.view(1, 1, 1, 32)) + phase)  # (B, 3, 32, 32)
    return {"image": image, "tokenizer_view": torch.rand(num_images, 3, 8, 8, generator=g), "mask": mask}


def test_pixel_head_predicts_patch_size_squared_times_three_values_per_masked_patch():
    torch.manual_seed(0)
    model = BeitMIM(TINY, vocab_size=16, target="pixels")
    batch = _batch()
    out = model(batch["image"], batch["mask"])
    assert out.shape == (int(batch["mask"].sum()), 4 * 4 * 3)
    assert isinstance(model.pixel_head, nn.Linear) and not hasattr(model, "lm_head") and model.vocab_size == 0
    assert model.pixel_head.weight.std().item() == pytest.approx(0.02, rel=0.1) and not model.pixel_head.bias.any()
    tokens = BeitMIM(TINY, vocab_size=16)
    assert backbone_param_count(model) == backbone_param_count(tokens)  # the same backbone, another head
    pixel_keys, token_keys = set(model.state_dict()), set(tokens.state_dict())
    assert pixel_keys ^ token_keys == {"pixel_head.weight", "pixel_head.bias", "lm_head.weight", "lm_head.bias"}
    with pytest.raises(RuntimeError, match="pixel_head"):  # a token checkpoint never loads into a pixel model
        model.load_state_dict(tokens.state_dict())


def test_the_token_model_is_unchanged_by_the_pixel_option():
    torch.manual_seed(0)
    default = BeitMIM(TINY, vocab_size=16)
    torch.manual_seed(0)
    explicit = BeitMIM(TINY, vocab_size=16, target="tokens")
    assert list(default.state_dict()) == list(explicit.state_dict())
    assert list(default.state_dict())[-2:] == ["lm_head.weight", "lm_head.bias"]
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    with pytest.raises(ValueError, match="masking.target='pixel' must be 'tokens' or 'pixels'"):
        BeitMIM(TINY, vocab_size=16, target="pixel")


def test_normalised_patch_pixels_equal_a_computation_by_hand():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 4, 6)  # a 2x3 grid of 2 px patches
    image[0, :, 0:2, 2:4] = 0.5  # one flat patch (its mean exact in fp32): its target is 0
    target = normalized_patch_pixels(image, 2)
    assert target.shape == (1, 6, 12) and target.dtype == torch.float32
    for i in range(2):
        for j in range(3):
            # the patch's pixels row by row, each pixel's three channels together (MAE's patchify order)
            pixels = [image[0, c, 2 * i + a, 2 * j + b].item() for a in range(2) for b in range(2) for c in range(3)]
            mean, var = statistics.fmean(pixels), statistics.variance(pixels)  # unbiased, as torch.var and MAE
            expected = torch.tensor([(p - mean) / (var + 1e-6) ** 0.5 for p in pixels])
            torch.testing.assert_close(target[0, i * 3 + j], expected, rtol=1e-5, atol=1e-5)
    assert not target[0, 1].any()  # the flat patch
    assert torch.equal(patchify(image, 2)[0, 4], image[0, :, 2:4, 2:4].permute(1, 2, 0).flatten())


def test_pixel_loss_decreases_in_a_few_steps_of_a_tiny_model(one_thread):
    torch.manual_seed(0)
    model = BeitMIM(TINY, vocab_size=0, drop_path=0.0, target="pixels")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = _batch()
    losses = []
    for _ in range(20):
        out = mim_forward(model, None, batch, torch.device("cpu"), torch.float32)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert out.hits is None and out.tokens is None and out.metrics == {}
    assert out.targets.shape == (int(batch["mask"].sum()), 48)
    assert losses[0] == pytest.approx(1.0, abs=0.2)  # unit-variance targets, a near-zero prediction at init
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses  # 1.02 -> 0.76 (seed 0)
    # The loss is the MSE over the masked patches of the per-patch normalised pixels.
    expected = normalized_patch_pixels(batch["image"], 4)[batch["mask"]]
    torch.testing.assert_close(out.targets, expected)


@pytest.fixture
def data_root(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    return tmp_path / "train"


def _pretrain(data_root, *overrides):
    return load_config("pretrain_base_in1k", [f"data.root={data_root}", "train.micro_batch=8", "train.global_batch=16",
                                              *overrides])


def test_pixels_need_no_tokenizer_file_and_tokens_say_how_to_do_without_one(data_root):
    validate(_pretrain(data_root, "masking.target=pixels", "tokenizer.path="), world_size=2)
    validate(_pretrain(data_root, "masking.target=pixels", "tokenizer.path=/nowhere/tok.safetensors"), world_size=2)
    with pytest.raises(ValueError, match=r"tokenizer\.path is empty; pretraining with masking\.target=tokens needs a "
                                         r"trained tokenizer.*or set masking\.target=pixels"):
        validate(_pretrain(data_root, "tokenizer.path="), world_size=2)
    with pytest.raises(ValueError, match=r"masking\.target='pixel' must be one of 'tokens', 'pixels'"):
        _pretrain(data_root, "masking.target=pixel")
    with pytest.raises(ValueError, match=r"masking\.num_masked=196 must be >= 1 and < 196 patches"):
        validate(_pretrain(data_root, "masking.target=pixels", "masking.num_masked=196"), world_size=2)


def test_pixel_model_weights_fine_tune_and_export_without_the_pixel_head():
    from beit_scale.checkpoint.export import timm_state_dict

    torch.manual_seed(0)
    sd = BeitMIM(TINY, vocab_size=0, target="pixels").state_dict()
    classifier = build_classifier(TINY, num_classes=10)
    converted = mim_to_classifier_state_dict(sd, classifier)
    classifier.load_state_dict(converted, strict=True)
    assert torch.equal(converted["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    backbone, num_classes, img_size = timm_state_dict(sd, "beit_tiny_patch4_32")
    assert (num_classes, img_size) == (0, 32) and not any(k.startswith("pixel_head") for k in backbone)
    with pytest.raises(ValueError, match="pixel_head"):
        to_timm_state_dict({k: v for k, v in sd.items() if k.startswith("pixel_head")})
