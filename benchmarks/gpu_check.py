"""One GPU, one script: bf16 correctness of the pretraining engine on CUDA, then throughput and memory.

Run on a CUDA machine from the repository root (DeepSpeed installed):
    python benchmarks/gpu_check.py --out gpu_check.json
Prints one JSON line per check and writes them all to --out. Run beside ../shared/bench/gpu_anchor.py
(plain timm and naive DeepSpeed, same card) for a fair ratio.

Checks:
- fp32 (TF32 off): 3 DeepSpeed ZeRO-1 steps equal 3 plain-PyTorch steps (loss and weights).
- bf16 at ZeRO 0, 1, 2, 3: the real pretrain_step (dVAE tokenizer labels, BeitMIM predicts) runs, the
  parameters are bf16, and the first loss is within 2% of the fp32 loss on the same batch.
- Throughput and peak memory of the engine step for beit_base at batch 128, bf16: the model step alone
  (random targets, as gpu_anchor measures it) and the full step with the 8192-token dVAE at 112 px.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

from beit_scale.config import load_config
from beit_scale.engine.core import StepSchedule, build_engine, build_optimizer, engine_dtype
from beit_scale.engine.dist import init_distributed
from beit_scale.engine.ds_config import build_ds_config
from beit_scale.models import build_mim_model
from beit_scale.tokenizers import DiscreteVAE, DVAEArch
from beit_scale.train.pretrain import pretrain_step, to_device

ROWS = []
BASE, BIG_BATCH, SMALL_BATCH = "beit_base_patch16_224", 128, 16  # --smoke: tiny sizes on the CPU
CUDA = torch.cuda.is_available()


def emit(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def cfg_for(model, stage, precision, batch, **extra):
    overrides = [f"model.name={model}", "model.drop_path=0.0", f"engine.zero_stage={stage}",
                 f"engine.precision={precision}", "engine.ds_config=ds_configs/base.json",
                 f"train.micro_batch={batch}", f"train.global_batch={batch}", "train.total_steps=100",
                 "optim.warmup_steps=0", "optim.lr=1e-3"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def make_batch(batch, img, tok_px, grid, num_masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, grid * grid, dtype=torch.bool)
    for i in range(batch):
        mask[i, torch.randperm(grid * grid, generator=g)[:num_masked]] = True
    return {"image": torch.randn(batch, 3, img, img, generator=g),
            "tokenizer_view": torch.rand(batch, 3, tok_px, tok_px, generator=g), "mask": mask}


def fp32_matches_reference(info):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for this comparison
    torch.backends.cudnn.allow_tf32 = False
    cfg = cfg_for("beit_tiny_patch16_224", 1, "fp32", 8, **{"optim.clip_grad": 0.05})
    torch.manual_seed(1)
    tok = DiscreteVAE(DVAEArch(vocab_size=512, input_size=112, downsample=8, hidden_dim=16, codebook_dim=32)).to(info.device).eval()
    batches = [make_batch(8, 224, 112, 14, 75, seed=s) for s in range(3)]
    torch.manual_seed(0)
    engine, sched = build_engine(build_mim_model(cfg.model, 512), cfg.optim, build_ds_config(cfg, 1), 100)
    ds_losses = []
    for s, b in enumerate(batches):
        sched.apply(s)
        ds_losses.append(pretrain_step(engine, tok, b, info.device, torch.float32).loss.item())
    torch.manual_seed(0)
    ref = build_mim_model(cfg.model, 512).to(info.device)
    opt = build_optimizer(ref, cfg.optim)
    ref_sched = StepSchedule(opt, cfg.optim, 100)
    ref_losses = []
    for s, b in enumerate(batches):
        ref_sched.apply(s)
        images, views, mask, idx = to_device(b, info.device, torch.float32)
        targets = tok.encode(views).flatten()[idx]
        loss = F.cross_entropy(ref(images, mask, idx), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    ref_state = ref.state_dict()
    diff = max((v - ref_state[k]).abs().max().item() for k, v in engine.module.state_dict().items())
    emit(check="fp32_zero1_vs_torch_cuda", ds_losses=ds_losses, ref_losses=ref_losses, max_weight_diff=diff,
         ok=diff < 1e-5 and max(abs(a - b) for a, b in zip(ds_losses, ref_losses)) < 1e-5)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def bf16_every_stage(info):
    torch.manual_seed(1)
    tok = DiscreteVAE(DVAEArch(vocab_size=8192, input_size=112, downsample=8)).to(info.device).eval()
    b = make_batch(SMALL_BATCH, 224, 112, 14, 75)
    first = {}
    for precision, stage in [("fp32", 1), ("bf16", 0), ("bf16", 1), ("bf16", 2), ("bf16", 3)]:
        cfg = cfg_for(BASE, stage, precision, SMALL_BATCH)
        torch.manual_seed(0)
        engine, sched = build_engine(build_mim_model(cfg.model, 8192), cfg.optim, build_ds_config(cfg, 1), 100)
        dtype = engine_dtype(engine)
        losses = []
        for s in range(3):
            sched.apply(s)
            losses.append(pretrain_step(engine, tok, b, info.device, dtype).loss.item())
        first[(precision, stage)] = losses[0]
        ref = first[("fp32", 1)]
        emit(check=f"{precision}_zero{stage}_cuda", losses=losses,
             param_dtype=str(next(engine.module.parameters()).dtype),
             first_loss_rel_diff_vs_fp32=abs(losses[0] - ref) / ref,
             ok=all(l == l for l in losses) and abs(losses[0] - ref) / ref < 0.02)
        del engine
        if CUDA:
            torch.cuda.empty_cache()


def throughput(info, stage, batch, with_tokenizer, steps=20, warmup=5, zero_extra=None, compile=False, label=""):
    cfg = cfg_for(BASE, stage, "bf16", batch)
    torch.manual_seed(0)
    ds = build_ds_config(cfg, 1)
    ds["zero_optimization"].update(zero_extra or {})
    engine, sched = build_engine(build_mim_model(cfg.model, 8192), cfg.optim, ds, 100)
    if compile:
        engine.compile()
    tok = DiscreteVAE(DVAEArch(vocab_size=8192, input_size=112, downsample=8)).to(info.device).eval()
    batches = [make_batch(batch, 224, 112, 14, 75, seed=s) for s in range(2)]
    targets = torch.randint(0, 8192, (batch * 75,), device=info.device)
    dtype = engine_dtype(engine)

    def step(b):
        if with_tokenizer:
            return pretrain_step(engine, tok, b, info.device, dtype).loss
        images, _, mask, idx = to_device(b, info.device, dtype)
        loss = F.cross_entropy(engine(images, mask, idx).float(), targets)
        engine.backward(loss)
        engine.step()
        return loss

    for i in range(warmup):
        step(batches[i % 2])
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % 2])
    loss = float(loss)
    if CUDA:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    emit(check="throughput", label=label, model=BASE, zero=stage, batch=batch, tokenizer=with_tokenizer,
         img_s=round(batch * steps / dt, 1), peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None,
         loss=round(loss, 3))
    del engine
    if CUDA:
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, runs on the CPU: checks the script")
    ap.add_argument("--perf", action="store_true", help="only the engine variants of the throughput study")
    args = ap.parse_args()
    global BASE, BIG_BATCH, SMALL_BATCH
    if args.smoke:
        BASE, BIG_BATCH, SMALL_BATCH = "beit_tiny_patch16_224", 2, 2
    info = init_distributed()
    emit(check="device", name=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__)
    if args.perf:
        big = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
        for label, extra, comp in [("ds_configs/base.json", None, False), ("buckets 5e8", big, False),
                                   ("buckets 5e8 + engine.compile()", big, True)]:
            try:
                throughput(info, 1, BIG_BATCH, False, zero_extra=extra, compile=comp, label=label)
            except Exception as err:
                emit(check="throughput", label=label, error=repr(err)[:500])
        with open(args.out, "w") as f:
            json.dump(ROWS, f, indent=1)
        return
    for fn in (fp32_matches_reference, bf16_every_stage):
        try:
            fn(info)
        except Exception as err:  # keep going: one failure must not lose the other rows
            emit(check=fn.__name__, error=repr(err)[:500], ok=False)
    for stage, batch, tok in [(1, BIG_BATCH, False), (1, BIG_BATCH, True), (2, BIG_BATCH, False), (3, BIG_BATCH, False)]:
        try:
            throughput(info, stage, batch, tok)
        except Exception as err:
            emit(check="throughput", zero=stage, tokenizer=tok, error=repr(err)[:500])
    with open(args.out, "w") as f:
        json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()
