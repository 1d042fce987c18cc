"""Throughput of the pretraining step on one card: plain PyTorch beside the beit_scale engine, same model and batch.

Run from the repository root on a CUDA machine (DeepSpeed installed), beside ../shared/bench/gpu_anchor.py in
the same call for a fair ratio:
    python benchmarks/throughput.py --out benchmarks/results/throughput_<card>.json
    python benchmarks/throughput.py --smoke --out /tmp/t.json   # tiny, on the CPU: checks the script

Rows per model size (base, large, giant; --models to choose): plain PyTorch (the BEiT MIM model, fused AdamW,
bf16 autocast) eager and compiled; the beit_scale engine (ds_configs/base.json's settings, bf16) at ZeRO 1, 2
and 3; ZeRO-1 with the dVAE tokenizer labelling the views in fp32 and in fp16 (bf16 on the CPU), as
tokenizer.precision sets it (beit_scale/tokenizers/labeler.py). Each row: img/s, TFLOP/s and MFU per device (model
FLOPs from models/flops.py; the peak from --peak-tflops or a measured bf16 matmul), peak GiB, and host syncs per
step (calls of Tensor.item, __bool__ and tolist while the timed steps run). One JSON line per row on stdout, all
rows to --out.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from beit_scale.config import load_config
from beit_scale.engine.core import build_engine, build_optimizer, engine_dtype
from beit_scale.engine.dist import init_distributed
from beit_scale.engine.ds_config import build_ds_config
from beit_scale.models import build_mim_model, get_spec
from beit_scale.models.flops import backbone_flops, head_flops, train_flops
from beit_scale.tokenizers import DiscreteVAE, DVAEArch
from beit_scale.tokenizers.labeler import Labeler
from beit_scale.train.metrics import measure_peak_tflops
from beit_scale.train.pretrain import pretrain_step, to_device
from gpu_check import make_batch  # benchmarks/ is the script's folder

CUDA = torch.cuda.is_available()
VOCAB, MASKED, TOKENIZER_PX = 8192, 75, 112
SIZES = {"base": ("beit_base_patch16_224", 128), "large": ("beit_large_patch16_224", 64),
         "giant": ("beit_giant_patch14_224", 32), "tiny": ("beit_tiny_patch16_224", 8)}  # tiny: the CPU figure


class SyncCounter:
    """Counts Tensor.item, __bool__ and tolist calls while active: each is a host sync on a GPU tensor."""

    def __init__(self):
        self.calls, self.active = 0, False
        for name in ("item", "__bool__", "tolist"):
            original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(original))

    def _counted(self, original):
        def call(tensor, *args, **kwargs):
            if self.active:
                self.calls += 1
            return original(tensor, *args, **kwargs)
        return call


def timed(step, batches, steps: int, warmup: int, syncs: SyncCounter) -> tuple[float, float, float]:
    """(seconds per step, peak GiB, host syncs per step) of ``step`` over the timed steps."""
    for i in range(warmup):
        step(batches[i % 2])
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    syncs.calls, syncs.active = 0, True
    start = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % 2])
    syncs.active = False
    float(loss)  # waits for the last step
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
    return seconds, peak, syncs.calls / steps


def plain_step(model, optimizer, dtype, targets):
    """What one would write by hand: autocast, the MIM loss on the masked patches, fused AdamW."""
    device = targets.device

    def step(b):
        images, _, mask, idx = to_device(b, device, torch.float32)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(images, mask, idx).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def engine_step(engine, tokenizer, targets, device):
    """The engine's micro step and optimizer step: with a tokenizer, the real pretrain_step; without, random
    targets (the model step alone, as gpu_anchor measures it)."""
    dtype = engine_dtype(engine)

    def step(b):
        if tokenizer is not None:
            return pretrain_step(engine, tokenizer, b, device, dtype).loss
        images, _, mask, idx = to_device(b, device, dtype)
        loss = F.cross_entropy(engine(images, mask, idx).float(), targets)
        engine.backward(loss)
        engine.step()
        return loss.detach()
    return step


def rows_for(size: str, name: str, batch: int, args, info, syncs: SyncCounter, emit) -> None:
    spec = get_spec(name)
    precision = "bf16" if CUDA else "fp32"
    dtype = torch.bfloat16 if CUDA else torch.float32
    flops = train_flops(backbone_flops(spec, spec.img_size) + head_flops(spec, MASKED, VOCAB)) * batch
    grid = spec.img_size // spec.patch_size
    tok_px = grid * 8  # an 8x-downsampling tokenizer sees the patch grid: 112 px at patch 16, 128 at patch 14
    batches = [make_batch(batch, spec.img_size, tok_px, grid, MASKED, seed=s) for s in range(2)]
    targets = torch.randint(0, VOCAB, (batch * MASKED,), device=info.device)
    peak = args.peak_tflops or (measure_peak_tflops(info.device, torch.bfloat16) if CUDA else 0.0)

    def report(label, seconds, gib, per_step):
        tflops = flops / seconds / 1e12
        emit(model=name, size=size, row=label, batch=batch, precision=precision, img_s=round(batch / seconds, 1),
             tflops=float(f"{tflops:.3g}"), mfu=round(tflops / peak, 3) if peak else None,
             peak_GiB=round(gib, 2) if gib is not None else None, host_syncs_per_step=per_step)

    def cfg(stage):
        return load_config(None, [f"model.name={name}", "model.drop_path=0.1", f"engine.zero_stage={stage}",
                                  f"engine.precision={precision}", "engine.ds_config=ds_configs/base.json",
                                  f"train.micro_batch={batch}", f"train.global_batch={batch}",
                                  "train.total_steps=1000", "optim.warmup_steps=0"])

    for compiled in ([False, True] if args.compile else [False]):
        torch.manual_seed(0)
        model = build_mim_model(cfg(1).model, VOCAB).to(info.device)
        optimizer = build_optimizer(model, cfg(1).optim)
        step = plain_step(torch.compile(model) if compiled else model, optimizer, dtype, targets)
        report(f"plain PyTorch{', compiled' if compiled else ''}", *timed(step, batches, args.steps, args.warmup, syncs))
        del model, optimizer, step
    tokenizer = DiscreteVAE(DVAEArch(vocab_size=VOCAB, input_size=tok_px, downsample=8)).to(info.device).eval()
    # The labels at fp32 and at the reduced precision a GPU recipe may set (tokenizer.precision).
    for stage, labels in ((1, None), (2, None), (3, None), (1, "fp32"), (1, "fp16" if CUDA else "bf16")):
        c = cfg(stage)
        torch.manual_seed(0)
        engine, _ = build_engine(build_mim_model(c.model, VOCAB), c.optim, build_ds_config(c, 1), 1000)
        if args.compile:
            engine.compile()
        labeler = labels and Labeler(tokenizer, labels, channels_last=CUDA, compile=args.compile)
        step = engine_step(engine, labeler, targets, info.device)
        label = f"beit_scale ZeRO-{stage}{f' + tokenizer {labels}' if labels else ''}{', compiled' if args.compile else ''}"
        report(label, *timed(step, batches, args.steps, args.warmup, syncs))
        del engine, step
        if CUDA:
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="throughput.json")
    ap.add_argument("--models", default="base,large,giant", help="comma-separated: base, large, giant, tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (0: measure)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled rows")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, 2 steps: checks the script")
    args = ap.parse_args()
    sizes = {size: SIZES[size] for size in args.models.split(",")}
    if args.smoke:
        sizes, args.steps, args.warmup, args.compile = {"tiny": ("beit_tiny_patch16_224", 2)}, 2, 1, False
    info = init_distributed()
    syncs, rows = SyncCounter(), []

    def emit(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    emit(device=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__)
    for size, (name, batch) in sizes.items():
        try:
            rows_for(size, name, batch, args, info, syncs, emit)
        except Exception as err:  # keep going: one size must not lose the others' rows
            emit(model=name, error=repr(err)[:500])
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
