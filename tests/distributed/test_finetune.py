"""Fine-tuning on 2 real ranks: layer-wise lr decay equals plain PyTorch at ZeRO 1-3, and a checkpoint written by
`beit-scale pretrain` fine-tunes at the same resolution, at a higher one, through a two-stage chain, resumes
exactly, feeds a linear probe and exports to timm, all through the real CLI and no hand-edited files."""
import json
import math
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from beit_scale.data import export_fashion_mnist
from beit_scale.models import ZOO, BeitMIM, build_classifier
from tests.distributed.ranks import ROOT, rank_env, run_ranks, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore::UserWarning:timm.layers.interpolate")]

TINY = ZOO["beit_tiny_patch4_32"]
TINY_TIMM = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3)  # timm's entry, shrunk to TINY
SMALL = ["train.micro_batch=8", "train.global_batch=16", "optim.warmup_steps=1", "data.num_workers=0"]


def cli(job: str, *args: str) -> list[str]:
    return torchrun(2, "-m", "beit_scale.cli", job, *args)


def metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fashion-MNIST (10 classes) and a relabelled 2-class subset: footwear vs. trousers and bags (symlinks)."""
    root = tmp_path_factory.mktemp("ft_data")
    train, val = export_fashion_mnist(root, "train", limit=128), export_fashion_mnist(root, "test", limit=64)
    relabelled = {}
    for split, src in (("train", train), ("test", val)):
        for new, old in (("footwear", ("sandal", "sneaker", "ankle_boot")), ("other", ("trouser", "bag"))):
            (root / "two" / split / new).mkdir(parents=True)
            for name in old:
                for image in (src / name).glob("*.png"):
                    (root / "two" / split / new / image.name).symlink_to(image)
        relabelled[split] = root / "two" / split
    return {"train": train, "val": val, "train2": relabelled["train"], "val2": relabelled["test"]}


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """`beit-scale pretrain` under torchrun, ZeRO-2: 4 steps, checkpoints at steps 2 and 4, tag `pt`."""
    from beit_scale.checkpoint.tokenizer_file import save_tokenizer
    from beit_scale.tokenizers import DiscreteVAE, DVAEArch

    out = tmp_path_factory.mktemp("pt")
    tok = DiscreteVAE(DVAEArch(vocab_size=16, input_size=32, downsample=4, hidden_dim=8, codebook_dim=8))
    save_tokenizer(tok, tok.state_dict(), out.parent / "pt_tok.safetensors")
    run_ranks(cli("pretrain", "--config", "quickstart_pretrain", f"run.output_dir={out}", "run.name=pt",
                  f"data.root={data['train']}", f"tokenizer.path={out.parent / 'pt_tok.safetensors'}",
                  "engine.zero_stage=2", "train.total_steps=4", "train.log_every=2", "checkpoint.every_steps=2",
                  *SMALL), timeout=240)
    return out


def finetune_a(data, pretrained, out) -> list[str]:
    """Same resolution from the pretraining run folder; ZeRO-1, RandAugment, erasing, mixup/cutmix, EMA."""
    return cli("finetune", "--config", "finetune_quickstart", f"run.output_dir={out}", "run.name=pt_ft",
               f"finetune.init_from={pretrained}", f"data.root={data['train']}", f"data.val_root={data['val']}",
               "engine.zero_stage=1", "train.total_steps=6", "train.log_every=1", "finetune.eval_every=3",
               "finetune.mixup=0.8", "finetune.cutmix=1.0", "finetune.ema_decay=0.9", "checkpoint.every_steps=2",
               *SMALL)


@pytest.fixture(scope="module")
def finetuned(data, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_a")
    proc = run_ranks(finetune_a(data, pretrained, out), timeout=240)
    return out, proc.stderr


def records(out) -> tuple[dict, dict]:
    """({step: loss}, {step: eval results}) from metrics.jsonl, the last record of each step winning."""
    losses, evals = {}, {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval" in rec:
            evals[rec["step"]] = rec["eval"]
        else:
            losses[rec["step"]] = rec["loss"]
    return losses, evals


# ------------------------------------------------------------------------------------------------ layer decay


@pytest.fixture(scope="module")
def layer_decay_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("layer_decay") / "report.json"
    run_ranks(torchrun(2, str(ROOT / "tests/distributed/finetune_step_worker.py"), str(out), "1", "2", "3"),
              timeout=240)
    return json.loads(out.read_text())


def cosine_lr(step: int, lr=2e-3, min_lr=1e-4, warmup=1, total=3) -> float:
    """The recipe's schedule written out: linear warmup from 0, then cosine to min_lr."""
    if step < warmup:
        return lr * step / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_layer_decay_lrs_and_weights_after_deepspeed_equal_plain_pytorch(layer_decay_report, stage):
    r = layer_decay_report[str(stage)]
    assert r["stage"] == stage
    top = r["num_blocks"] + 1  # layer id of fc_norm and head
    for step, groups in enumerate(r["groups"]):
        # 2 groups (decay / no decay) per layer 0..L+1 survive deepspeed.initialize, in order, with their scales
        assert [(g["layer_id"], g["weight_decay"]) for g in groups] == [
            (layer, wd) for layer in range(top + 1) for wd in (0.0, 0.05)]
        for g in groups:
            assert g["lr_scale"] == pytest.approx(0.65 ** (top - g["layer_id"]), rel=1e-12)
            assert g["lr"] == pytest.approx(cosine_lr(step) * g["lr_scale"], rel=1e-9, abs=1e-15)
        assert [g["lr"] for g in groups] == [g["lr"] for g in r["ref_groups"][step]]
    # fp32: gloo's all-reduce sums in another order than one process does: 1e-6 on losses near 2.3, and 1e-6 on
    # weights that move by up to 3e-3 over the 3 steps (measured: 2e-8).
    assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-6)
    assert r["max_weight_diff"] < 1e-6, r["worst_tensor"]
    moved = r["weight_change"]
    assert moved["head.weight"] > 1e-3
    # the decay is felt: the lower the layer, the smaller the largest update
    order = ["patch_embed.proj.weight"] + [f"blocks.{i}.mlp.fc1.weight" for i in range(4)] + ["head.weight"]
    assert [moved[k] for k in order] == sorted(moved[k] for k in order)


# --------------------------------------------------------------------------------------------------- finetune


def test_finetune_from_a_pretraining_run_at_the_same_resolution(finetuned, pretrained, data):
    out, log = finetuned
    assert f"initialised from {pretrained / 'model.safetensors'} (weights, trained as beit_tiny_patch4_32, " \
           "lineage pt)" in log
    assert "layer    lr scale  weight decay" in log and "0.2373" in log  # the group table, 0.75 ** 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_images"] == 64 and summary["num_classes"] == 10 and summary["img_size"] == 32
    for key in ("top1", "top5", "top1_ema", "top5_ema"):
        assert 0 <= summary[key] <= 1
    assert summary["top5"] >= summary["top1"]
    assert (summary["lineage"], summary["init_lineage"], summary["world_size"]) == ("pt_ft", "pt", 2)
    _, evals = records(out)
    assert sorted(evals) == [3, 6] and evals[6]["top1"] == summary["top1"]
    meta = metadata(out / "model.safetensors")
    assert (meta["lineage"], meta["parent_lineage"], meta["num_classes"]) == ("pt_ft", "pt", "10")
    assert len(json.loads(meta["classes"])) == 10
    model = build_classifier(TINY, 10)
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    ema = load_file(str(out / "model_ema.safetensors"))
    assert ema.keys() == model.state_dict().keys()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_killed_finetune_resumes_with_identical_losses_evals_and_weights(finetuned, pretrained, data, tmp_path):
    full, _ = finetuned
    cmd = finetune_a(data, pretrained, tmp_path)
    killed = subprocess.run(cmd, env=rank_env(BEIT_SCALE_FAULT="after_step@5"), capture_output=True, text=True,
                            timeout=240)
    assert killed.returncode != 0 and "fault hook: killing rank 0" in killed.stderr
    proc = run_ranks(cmd, timeout=240)
    assert f"resumed from {tmp_path / 'checkpoints'}/step_000000004 at step 4" in proc.stderr
    assert "initialised from" not in proc.stderr  # the checkpoint's weights, not init_from's
    assert records(tmp_path) == records(full)  # mixup, RandAugment, erasing and drop path replayed exactly
    for name in ("model", "model_ema"):
        resumed, reference = load_file(str(tmp_path / f"{name}.safetensors")), load_file(str(full / f"{name}.safetensors"))
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), name


def test_finetune_from_a_checkpoint_folder_at_a_higher_resolution_zero3(pretrained, data, tmp_path):
    step = pretrained / "checkpoints" / "step_000000004"
    proc = run_ranks(cli("finetune", "--config", "finetune_quickstart", f"run.output_dir={tmp_path}",
                         f"finetune.init_from={step}", "model.img_size=64", f"data.root={data['train']}",
                         f"data.val_root={data['val']}", "engine.zero_stage=3", "train.total_steps=2",
                         "train.log_every=1", *SMALL), timeout=240)
    assert "consolidated" in proc.stderr and f"initialised from {step} (checkpoint" in proc.stderr
    assert "resized to (964, 3) for window (16, 16)" in proc.stderr  # 8x8 -> 16x16 patches
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["img_size"] == 64 and 0 <= summary["top1"] <= 1 and summary["init_lineage"] == "pt"
    weights = load_file(str(tmp_path / "model.safetensors"))  # gathered from ZeRO-3 partitions
    assert all(weights[f"blocks.{i}.attn.relative_position_bias_table"].shape == (31 * 31 + 3, 3) for i in range(4))
    # the consolidated source equals the run's final weights (the last checkpoint is step 4)
    source, final = load_file(str(tmp_path / "init_weights.safetensors")), load_file(str(pretrained / "model.safetensors"))
    assert all(torch.equal(source[k], final[k]) for k in final)


def test_two_stage_chain_onto_a_relabelled_two_class_set_bf16(finetuned, data, tmp_path):
    first, _ = finetuned
    proc = run_ranks(cli("finetune", "--config", "finetune_quickstart", f"run.output_dir={tmp_path}",
                         "run.name=pt_ft_ft2", f"finetune.init_from={first}", "finetune.num_classes=2",
                         f"data.root={data['train2']}", f"data.val_root={data['val2']}", "engine.zero_stage=2",
                         "engine.precision=bf16", "train.total_steps=2", "train.log_every=1", *SMALL), timeout=240)
    assert "head dropped, the number of classes differs" in proc.stderr
    assert "dropped from the checkpoint" not in proc.stderr  # fc_norm comes along: nothing else is dropped
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["num_classes"], summary["lineage"], summary["init_lineage"]) == (2, "pt_ft_ft2", "pt_ft")
    assert 0 <= summary["top1"] <= 1 and summary["top5"] == 1.0 and summary["val_images"] > 0
    meta = metadata(tmp_path / "model.safetensors")
    assert json.loads(meta["classes"]) == ["footwear", "other"] and meta["parent_lineage"] == "pt_ft"


def test_linear_probe_on_frozen_pretrained_blocks_zero3_resumes_after_a_preemption(pretrained, data, tmp_path):
    def linprobe(out):
        return cli("linprobe", "--config", "linprobe_quickstart", f"run.output_dir={out}",
                   f"finetune.init_from={pretrained}", "finetune.probe_block=2", f"data.root={data['train']}",
                   f"data.val_root={data['val']}", "engine.zero_stage=3", "train.total_steps=4", "train.log_every=1",
                   "finetune.eval_every=2", *SMALL)

    proc = run_ranks(linprobe(tmp_path), timeout=240)
    assert "linear probe of beit_tiny_patch4_32 after block 2/4 (batchnorm)" in proc.stderr
    # Through the same driver as the other jobs: a preemption after step 3 saves, and the relaunch matches
    stopped = tmp_path.parent / f"{tmp_path.name}_preempted"
    preempted = subprocess.run(linprobe(stopped), env=rank_env(BEIT_SCALE_FAULT="signal@3:1"), capture_output=True,
                               text=True, timeout=240, start_new_session=True)
    assert preempted.returncode != 0 and "preempted at step 3: exiting with 75" in preempted.stderr
    assert "continuing at step 3/4" in run_ranks(linprobe(stopped), timeout=240).stderr
    assert records(stopped) == records(tmp_path) and sorted(records(tmp_path)[1]) == [2, 4]
    assert torch.equal(load_file(str(stopped / "model.safetensors"))["head.weight"],
                       load_file(str(tmp_path / "model.safetensors"))["head.weight"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["top1"] <= 1 and summary["probe_block"] == 2 and summary["val_images"] == 64
    head = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(head) == ["head.bias", "head.weight", "norm.num_batches_tracked", "norm.running_mean",
                            "norm.running_var"]
    assert head["head.weight"].shape == (10, 96)


# ----------------------------------------------------------------------------------------------------- export


def test_export_of_a_finetuned_run_gives_timms_beit_the_same_logits(finetuned, tmp_path):
    out, _ = finetuned
    proc = subprocess.run([sys.executable, "-m", "beit_scale.cli", "export", str(out), str(tmp_path / "t.safetensors")],
                          cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["num_classes"] == "10"
    theirs = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=10, **TINY_TIMM).eval()
    theirs.load_state_dict(load_file(str(tmp_path / "t.safetensors")), strict=True)
    ours = build_classifier(TINY, 10).eval()
    ours.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs(images), ours(images))


def test_export_of_a_pretraining_checkpoint_is_timms_headless_backbone(pretrained, tmp_path):
    from beit_scale.checkpoint.export import export_for_timm

    step = pretrained / "checkpoints" / "step_000000004"
    report = export_for_timm(step, tmp_path / "b.safetensors")
    assert (report["num_classes"], report["img_size"], report["lineage"]) == ("0", "32", "pt")
    timm_model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, **TINY_TIMM).eval()
    timm_model.load_state_dict(load_file(str(tmp_path / "b.safetensors")), strict=True)
    mim = BeitMIM(TINY, vocab_size=16).eval()
    mim.load_state_dict(load_file(str(pretrained / "model.safetensors")), strict=True)
    seen = {}
    mim.norm.register_forward_hook(lambda m, args, out: seen.update(tokens=args[0]))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        mim(images, torch.zeros(2, 64, dtype=torch.bool))
        expected = F.layer_norm(seen["tokens"][:, 1:].mean(1), (96,), eps=1e-6)  # fresh fc_norm of the mean
        torch.testing.assert_close(timm_model(images), expected)
    with pytest.raises(ValueError, match="do not load strictly into timm's beit_base_patch16_224"):
        export_for_timm(step, tmp_path / "c.safetensors", timm_name="beit_base_patch16_224")
