"""MFU's numerator: the FLOPs we count from a model's shape equal what torch's FLOP counter sees in a real forward
and backward of the same model; the meter turns images/s into TFLOP/s and MFU per device."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from beit_scale.config import load_config
from beit_scale.models import build_classifier, build_mim_model, get_spec
from beit_scale.models.flops import backbone_flops, head_flops, train_flops
from beit_scale.train import metrics

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = get_spec("beit_tiny_patch4_32")  # 8x8 patches of 4 px, width 96, MLP 384, 4 blocks


def counted(model, *inputs) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) torch counts for one batch."""
    with FlopCounterMode(display=False) as fwd:
        out = model(*inputs)
    with FlopCounterMode(display=False) as both:
        out = model(*inputs)
        out.float().sum().backward()
    return fwd.get_total_flops(), both.get_total_flops()


def test_pretraining_flops_equal_torchs_count_of_the_mim_model():
    model = build_mim_model(load_config(None, ["model.name=beit_tiny_patch4_32", "model.drop_path=0.0"]).model, 64)
    images, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :26] = True
    forward, total = counted(model, images, mask, mask.flatten().nonzero().squeeze(1))
    ours = backbone_flops(SPEC, 32) + head_flops(SPEC, 26, 64)  # per image
    assert forward == 2 * ours
    # backward: twice the forward, less the gradient of the input image (the patch embedding's input needs none)
    assert total == pytest.approx(2 * train_flops(ours), rel=0.02)


def test_a_frozen_backbone_costs_one_forward():
    model = build_classifier(SPEC, 10, 32, drop_path=0.0)
    forward, _ = counted(model, torch.randn(1, 3, 32, 32))
    assert forward == backbone_flops(SPEC, 32) + head_flops(SPEC, 1, 10)
    assert backbone_flops(SPEC, 32, 2) < backbone_flops(SPEC, 32)  # the probe's first blocks only
    assert train_flops(3.0, 5.0) == 14.0


def test_base_is_the_published_17_6_gmacs_forward():
    assert backbone_flops(get_spec("beit_base_patch16_224"), 224) / 2 == pytest.approx(17.58e9, rel=0.01)


def test_the_meter_reports_images_tflops_and_mfu_per_device_once_per_step_not_per_micro_batch(monkeypatch):
    clock = iter([0.0, 0.0, 2.0])  # the meter starts, the first step ends, the flush 2 s after the start
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    speed = metrics.Speed(flops_per_image=1e12, world_size=4, peak_tflops=10.0)
    meter = metrics.Meter(None, total_steps=10, images_per_step=16, speed=speed)
    for _ in range(2):  # two optimizer steps of two micro batches each
        meter.add(loss=torch.tensor(1.0))
        meter.add(loss=torch.tensor(3.0))
        meter.step_done()
    values = meter.flush(1)
    assert values["loss"] == 2.0 and values["images_per_s"] == 16.0  # 2 steps x 16 images / 2 s
    assert values["tflops"] == 4.0 and values["mfu"] == 0.4  # 16 img/s x 1 TFLOP / 4 devices; / 10 peak


def test_no_peak_means_tflops_without_mfu():
    assert metrics.Speed(2e12, 1, 0.0).of(3.0) == {"tflops": 6.0}
