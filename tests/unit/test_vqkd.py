"""VQ-KD (BEiT v2's tokenizer): the cosine EMA quantizer, the tokenizer file, the teacher and a short training."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from beit_scale.checkpoint.tokenizer_file import VQKD_FORMAT, load_tokenizer, read_tokenizer_arch, save_tokenizer
from beit_scale.checkpoint.weights import save_weights
from beit_scale.tokenizers import VQKD, VQKDArch, VQKDTokenizer, VisualTokenizer, codebook_stats
from beit_scale.tokenizers.labeler import Labeler
from beit_scale.tokenizers.quantizer import NormEMAQuantizer

TINY = VQKDArch(vocab_size=16, input_size=16, downsample=4, embed_dim=16, depth=1, num_heads=2, codebook_dim=4)


@pytest.fixture(autouse=True)
def _one_intra_op_thread(one_thread):
    """Tiny tensors on a shared 2-core machine: one intra-op thread."""


def _quantizer(codebook, decay=0.9, dead_code_steps=0) -> NormEMAQuantizer:
    q = NormEMAQuantizer(len(codebook), len(codebook[0]), decay, dead_code_steps)
    q.codebook.copy_(F.normalize(torch.tensor(codebook, dtype=torch.float32), dim=-1))
    return q


# --- quantizer ---------------------------------------------------------------------------------------------------


def test_the_nearest_code_is_by_cosine_not_by_euclidean_distance():
    q = _quantizer([[1.0, 0.0], [0.0, 1.0]]).eval()
    # (3, 1) is far from both unit codes in Euclid, but its angle is close to code 0; (0.1, 0.3) close to code 1
    out = q(torch.tensor([[3.0, 1.0], [0.1, 0.3], [-1.0, 5.0]]))
    assert out.ids.tolist() == [0, 1, 1]
    torch.testing.assert_close(out.quantized, q.codebook[out.ids])


def test_one_ema_step_equals_the_hand_computation():
    q = _quantizer([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], decay=0.9).train()
    z = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])  # ids 0, 0 (tie -> first), 1; code 2 unused
    out = q(z)
    assert out.ids.tolist() == [0, 0, 1]
    s = 2 ** -0.5
    mean0 = F.normalize(torch.tensor([1 + s, s]), dim=0)  # normalised sum of the normalised vectors of code 0
    code0 = F.normalize(0.9 * torch.tensor([1.0, 0.0]) + 0.1 * mean0, dim=0)
    torch.testing.assert_close(q.codebook, torch.stack([code0, torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0])]))
    torch.testing.assert_close(q.cluster_size, torch.tensor([0.2, 0.1, 0.0]))
    assert q.unused_steps.tolist() == [0, 0, 0]  # dead_code_steps=0: not counted


def test_eval_mode_leaves_the_codebook_alone():
    q = _quantizer([[1.0, 0.0], [0.0, 1.0]]).eval()
    before = q.codebook.clone()
    q(torch.randn(10, 2))
    assert torch.equal(q.codebook, before) and not q.cluster_size.any()


def test_a_code_unused_for_dead_code_steps_restarts_from_a_batch_vector():
    q = _quantizer([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dead_code_steps=2).train()
    batch = torch.tensor([[1.0, 0.1], [0.1, 1.0]])  # never near code 2
    q(batch)
    assert q.unused_steps.tolist() == [0, 0, 1]
    torch.testing.assert_close(q.codebook[2], torch.tensor([-1.0, 0.0]))
    torch.manual_seed(0)
    q(batch)
    assert q.unused_steps.tolist() == [0, 0, 0]  # restarted, count reset
    candidates = F.normalize(batch, dim=-1)
    assert min(float((q.codebook[2] - c).abs().max()) for c in candidates) < 1e-6


def test_the_straight_through_gradient_reaches_the_inputs_and_not_the_codebook():
    q = _quantizer([[1.0, 0.0], [0.0, 1.0]]).train()
    z = torch.tensor([[2.0, 0.5], [0.2, 1.0]], requires_grad=True)
    g = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    (q(z).quantized * g).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * g).sum().backward()  # identity through the quantization
    torch.testing.assert_close(z.grad, z2.grad)
    assert not q.codebook.requires_grad


def test_commitment_loss_is_the_mse_to_the_detached_codes():
    q = _quantizer([[1.0, 0.0], [0.0, 1.0]]).eval()
    z = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(q(z).commit_loss, F.mse_loss(F.normalize(z, dim=-1), torch.tensor([[1.0, 0.0]])))


def test_codebook_statistics_stay_float32_when_the_model_is_cast_to_bf16():
    model = VQKD(TINY, teacher_dim=8, decoder_depth=1).bfloat16()
    q = model.tokenizer.quantizer
    assert q.codebook.dtype == q.cluster_size.dtype == torch.float32 and q.unused_steps.dtype == torch.int64
    assert model.tokenizer.project[0].weight.dtype == torch.bfloat16
    out = model(torch.rand(2, 3, 16, 16, dtype=torch.bfloat16) * 2 - 1, torch.randn(2, 16, 8, dtype=torch.bfloat16))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# --- the tokenizer and its file -------------------------------------------------------------------------------------


def test_the_file_holds_the_labelling_half_and_gives_identical_ids(tmp_path):
    torch.manual_seed(0)
    model = VQKD(TINY, teacher_dim=8, decoder_depth=1, dead_code_steps=1)
    views = VQKDTokenizer.map_pixels(torch.rand(4, 3, 16, 16))
    model(views, torch.randn(4, 16, 8))  # one EMA step: the saved codebook is not the initial one
    model.eval()
    save_tokenizer(model, model.state_dict(), tmp_path / "tok.safetensors")
    assert read_tokenizer_arch(tmp_path / "tok.safetensors") == TINY
    tok = load_tokenizer(tmp_path / "tok.safetensors")
    assert isinstance(tok, VQKDTokenizer) and isinstance(tok, VisualTokenizer)
    assert (tok.vocab_size, tok.input_size, tok.grid_size) == (16, 16, 4)
    assert not any(k.startswith("decoder") for k in tok.state_dict())
    ids = tok.encode(views)
    assert ids.dtype == torch.int64 and ids.shape == (4, 16)
    assert torch.equal(ids, model.tokenizer.encode(views))
    assert torch.equal(Labeler(tok, "fp32").encode(views), ids)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tok.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == VQKD_FORMAT


def test_the_labeler_runs_the_vit_under_autocast_and_the_code_choice_in_fp32():
    torch.manual_seed(0)
    tok = VQKDTokenizer(dataclasses.replace(TINY, vocab_size=64, depth=2)).eval()
    views = tok.map_pixels(torch.rand(8, 3, 16, 16))
    labeler = Labeler(tok, "bf16")
    assert labeler.trunk is tok.encoder
    assert labeler.agreement(views) > 0.9 and int(labeler.nonfinite) == 0


def test_arch_validation_names_the_field():
    with pytest.raises(ValueError, match=r"tokenizer.input_size=18 must be a multiple .* set tokenizer.input_size=20"):
        dataclasses.replace(TINY, input_size=18)
    with pytest.raises(ValueError, match="tokenizer.embed_dim=15 must be divisible by tokenizer.num_heads=2"):
        dataclasses.replace(TINY, embed_dim=15)


# --- the teacher --------------------------------------------------------------------------------------------------


def _mim_teacher_file(path, seed=0):
    """A beit_tiny_patch4_32 pretraining weights file with random-but-fixed weights (8x8 patches of 32 px)."""
    from beit_scale.models import BeitMIM, get_spec

    torch.manual_seed(seed)
    model = BeitMIM(get_spec("beit_tiny_patch4_32"), vocab_size=16)
    save_weights(model.state_dict(), path, {"format": "beit_scale.mim.v1", "model": "beit_tiny_patch4_32"})
    return model


def test_a_pretraining_teacher_gives_its_final_normed_patch_tokens(tmp_path):
    from beit_scale.models.teacher import describe_teacher, load_teacher

    mim = _mim_teacher_file(tmp_path / "model.safetensors").eval()
    spec = describe_teacher(tmp_path / "model.safetensors")
    assert (spec.name, spec.img_size, spec.patch_size, spec.grid_size) == ("beit_tiny_patch4_32", 32, 4, 8)
    teacher = load_teacher(tmp_path / "model.safetensors", mean=(0.5,) * 3, std=(0.25,) * 3)
    pixels = torch.rand(2, 3, 32, 32)
    feats = teacher(pixels)
    assert feats.shape == (2, 64, 96) and teacher.feature_dim == 96
    x = (pixels - 0.5) / 0.25
    with torch.no_grad():
        reference = mim.forward_features(x)[:, 1:]  # timm's Beit: blocks with the shared table, then the final norm
    torch.testing.assert_close(feats, reference, atol=1e-5, rtol=1e-5)


def test_a_timm_teacher_file_loads_by_name_and_a_grid_mismatch_is_refused(tmp_path):
    import timm

    from beit_scale.models.teacher import check_teacher_grid, describe_teacher, load_teacher

    model = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=64).eval()  # patch 16: 4x4
    save_file(model.state_dict(), str(tmp_path / "vit.safetensors"), {"img_size": "64"})
    teacher = load_teacher(tmp_path / "vit.safetensors", "test_vit", mean=(0.0,) * 3, std=(1.0,) * 3)
    pixels = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(teacher(pixels), model.forward_features(pixels)[:, 1:])
    spec = describe_teacher(tmp_path / "vit.safetensors", "test_vit")
    with pytest.raises(ValueError, match=r"has a 4x4 patch grid but the tokenizer has 8x8"):
        check_teacher_grid(spec, 8, 32)


def test_a_vqkd_recipe_needs_a_teacher_with_the_tokenizers_grid(tmp_path):
    from beit_scale.checks import validate
    from beit_scale.config import load_config

    (tmp_path / "data" / "a").mkdir(parents=True)
    _mim_teacher_file(tmp_path / "teacher.safetensors")
    base = ["run.output_dir=" + str(tmp_path / "run"), f"data.root={tmp_path / 'data'}"]
    with pytest.raises(ValueError, match="tokenizer.teacher is empty"):
        validate(load_config("quickstart_tokenizer_vqkd", base), world_size=1)
    good = load_config("quickstart_tokenizer_vqkd", [*base, f"tokenizer.teacher={tmp_path / 'teacher.safetensors'}"])
    validate(good, world_size=1)
    with pytest.raises(ValueError, match=r"tokenizer.ema_decay=1.0 must be in \[0, 1\)"):
        validate(dataclasses.replace(good, tokenizer=dataclasses.replace(good.tokenizer, ema_decay=1.0)), 1)


# --- training on real images -----------------------------------------------------------------------------------------


def _fashion_mnist(num: int, size: int) -> torch.Tensor:
    from beit_scale.data.fashion_mnist import DEFAULT_SOURCE_DIR, has_fashion_mnist, read_idx_images

    if not has_fashion_mnist(DEFAULT_SOURCE_DIR):
        pytest.skip("needs Debian's dataset-fashion-mnist")
    items = torch.from_numpy(read_idx_images(DEFAULT_SOURCE_DIR / "train-images-idx3-ubyte.gz", limit=num).copy())
    items = items.float().div(255)[:, None].expand(-1, 3, -1, -1)  # (N, 3, 28, 28)
    return F.interpolate(items, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


def test_a_short_training_on_fashion_mnist_uses_most_codes_and_lowers_the_feature_loss(tmp_path):
    """Random-but-fixed beit_tiny_patch4_32 teacher; 64 codes; 8x8 tokens of 32 px Fashion-MNIST."""
    from beit_scale.models.teacher import load_teacher

    _mim_teacher_file(tmp_path / "teacher.safetensors")
    teacher = load_teacher(tmp_path / "teacher.safetensors")
    torch.manual_seed(0)
    arch = VQKDArch(vocab_size=64, input_size=32, downsample=4, embed_dim=64, depth=2, num_heads=4, codebook_dim=16)
    model = VQKD(arch, teacher.feature_dim, decoder_depth=1, decay=0.9, dead_code_steps=5)
    pixels = _fashion_mnist(256, 32)
    held_out = pixels[-64:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)

    def feature_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(model(model.tokenizer.map_pixels(held_out), teacher(held_out)).feature_loss)
        model.train()
        return loss

    initial = feature_loss()
    for step in range(60):
        batch = pixels[(step * 32) % 192:][:32]
        out = model(model.tokenizer.map_pixels(batch), teacher(batch))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    final = feature_loss()
    usage, perplexity = codebook_stats(model.tokenizer.eval().encode(model.tokenizer.map_pixels(held_out)), 64)
    assert final < 0.8 * initial, (initial, final)
    assert float(usage) > 0.5 and float(perplexity) > 8, (float(usage), float(perplexity))


# --- several ranks -----------------------------------------------------------------------------------------------


def _halves() -> torch.Tensor:
    """``(2, 6, 4)``: what rank 0 and rank 1 quantize."""
    return torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))


def _update_on_rank(rank: int, port: int, out: str) -> None:
    """One training forward of an 8-code quantizer on this rank's half (gloo, 2 ranks); its state saved to ``out``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial codebook on both ranks, as the seeded model init gives
    q = NormEMAQuantizer(8, 4, decay=0.5, dead_code_steps=1).train()
    torch.manual_seed(10 + rank)  # different restart draws per rank: the all-reduce must still make them agree
    q(_halves()[rank])
    torch.save({k: v.clone() for k, v in q.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_keep_the_same_codebook_and_sum_their_statistics(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_update_on_rank, args=(port, str(tmp_path)), nprocs=2, start_method="fork")  # no re-imports
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(0)
    single = NormEMAQuantizer(8, 4, decay=0.5, dead_code_steps=0).train()  # one process, both halves at once
    single(_halves().reshape(12, 4))
    torch.testing.assert_close(states[0]["cluster_size"], single.cluster_size)  # counts summed over ranks
    used = single.cluster_size > 0
    torch.testing.assert_close(states[0]["codebook"][used], single.codebook[used])
    restarted = states[0]["codebook"][~used]  # unused codes restarted from one rank's vectors or the other's
    candidates = F.normalize(_halves().reshape(12, 4), dim=-1)
    assert torch.cdist(restarted, candidates).min(dim=1).values.max() < 1e-5


# --- the job ---------------------------------------------------------------------------------------------------------


PRETRAIN_STEPS = 80


def test_train_tokenizer_vqkd_writes_a_file_that_pretraining_accepts(tmp_path):
    """`beit-scale train-tokenizer` with tokenizer.kind=vqkd on 1 rank (DeepSpeed ZeRO-1, fp32): 30 steps."""
    import json
    import subprocess
    import sys

    from beit_scale.checks import validate
    from beit_scale.config import load_config
    from beit_scale.data import export_fashion_mnist
    from tests.distributed.ranks import ROOT, rank_env

    _fashion_mnist(1, 28)  # skips without the dataset
    train, val = export_fashion_mnist(tmp_path, "train", limit=256), export_fashion_mnist(tmp_path, "test", limit=64)
    _mim_teacher_file(tmp_path / "teacher.safetensors")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "beit_scale.cli", "train-tokenizer", "--config", "quickstart_tokenizer_vqkd",
           f"run.output_dir={out}", f"data.root={train}", f"data.val_root={val}",
           f"tokenizer.teacher={tmp_path / 'teacher.safetensors'}", "tokenizer.vocab_size=64", "train.total_steps=30",
           "train.micro_batch=32", "train.global_batch=32", "train.log_every=5", "train.eval_batches=2",
           "optim.warmup_steps=3", "data.num_workers=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"feature_loss", "commit_loss", "codebook_usage", "perplexity"} <= set(records[-1])
    assert records[-1]["feature_loss"] < records[0]["feature_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokenizer_kind"] == "vqkd" and summary["eval_images"] == 64
    assert 0 < summary["tokenizer_codebook_usage"] <= 1 and summary["tokenizer_perplexity"] >= 1
    assert 0 <= summary["tokenizer_feature_loss"] < 1
    tok = load_tokenizer(out / "tokenizer.safetensors")
    assert (tok.vocab_size, tok.grid_size) == (64, 8)
    pretrain = load_config("quickstart_pretrain", [f"tokenizer.path={out / 'tokenizer.safetensors'}",
                                                   f"data.root={train}", f"run.output_dir={tmp_path / 'pt'}"])
    validate(pretrain, world_size=1)  # a recipe change only: the token grid matches beit_tiny_patch4_32's
    # and pretraining on its tokens learns them: held-out masked-token accuracy above always guessing the
    # held-out's most frequent token
    pt = tmp_path / "pt"
    cmd = [sys.executable, "-m", "beit_scale.cli", "pretrain", "--config", "quickstart_pretrain",
           f"run.output_dir={pt}", f"data.root={train}", f"data.val_root={val}",
           f"tokenizer.path={out / 'tokenizer.safetensors'}", f"train.total_steps={PRETRAIN_STEPS}",
           "train.micro_batch=32", "train.global_batch=32", "train.eval_batches=2", "optim.warmup_steps=5",
           "data.num_workers=0", "checkpoint.every_steps=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((pt / "summary.json").read_text())
    # (measured: 0.283 against 0.140, 42 of 64 codes in the targets)
    assert summary["masked_token_accuracy"] > summary["majority_token_accuracy"] + 0.05, summary
