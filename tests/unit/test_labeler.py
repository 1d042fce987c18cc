"""The tokenizer's labeller (tokenizers/labeler.py): exact at fp32, split where it should be, overflows counted.

The compiled labeller gives the eager labels: tests/distributed/test_compile.py (same losses). Agreement of the reduced precisions with fp32 on a real trained tokenizer and real images is measured in
tests/integration/test_quickstart.py, on the quickstart tokenizer and held-out Fashion-MNIST.
"""
import pytest
import torch

from beit_scale.tokenizers import DiscreteVAE, DVAEArch, VisualTokenizer
from beit_scale.tokenizers.labeler import Labeler, split_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_and_views():
    torch.manual_seed(0)
    tok = DiscreteVAE(DVAEArch(vocab_size=64, input_size=32, downsample=8, hidden_dim=8)).eval()
    views = tok.map_pixels(torch.rand(6, 3, 32, 32))
    return tok, views


def test_the_trunk_then_the_bottom_stage_is_the_encoder(tokenizer_and_views):
    tok, views = tokenizer_and_views
    trunk, bottom = split_encoder(tok.encoder)
    assert len(trunk) + len(bottom) == len(tok.encoder)
    assert isinstance(bottom[0], torch.nn.Conv2d) and bottom[0].stride == (2, 2)
    assert not [m for m in bottom[1:] if isinstance(m, torch.nn.Conv2d) and m.stride != (1, 1)]
    with torch.no_grad():
        assert torch.equal(bottom(trunk(views)), tok.encoder(views))


def test_an_encoder_without_downsampling_is_refused():
    with pytest.raises(ValueError, match="no downsampling"):
        split_encoder(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1)))


def test_fp32_labels_are_the_tokenizers_and_it_stands_for_the_tokenizer(tokenizer_and_views):
    tok, views = tokenizer_and_views
    labeler = Labeler(tok, "fp32")
    assert isinstance(labeler, VisualTokenizer)
    assert (labeler.vocab_size, labeler.input_size, labeler.grid_size) == (64, 32, 4)
    assert torch.equal(labeler.encode(views), tok.encode(views))
    assert labeler.agreement(views) == 1.0 and int(labeler.nonfinite) == 0
    with pytest.raises(ValueError, match="tokenizer view"):
        labeler.encode(views[:, :, :16, :16])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_labels_are_valid_ids_and_count_no_overflow(tokenizer_and_views, precision):
    tok, views = tokenizer_and_views
    labeler = Labeler(tok, precision)
    ids = labeler.encode(views)
    assert ids.shape == (6, 16) and ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 64
    assert int(labeler.nonfinite) == 0
    assert labeler.agreement(views) > 0.5  # random weights: near ties everywhere, so no tighter claim here


def test_an_fp16_overflow_is_counted(tokenizer_and_views):
    tok, views = tokenizer_and_views
    big = DiscreteVAE(tok.arch).eval()
    big.load_state_dict(tok.state_dict())
    with torch.no_grad():
        big.encoder[0].weight.mul_(1e6)  # activations far beyond fp16's 65504
    labeler = Labeler(big, "fp16")
    labeler.encode(views)
    assert int(labeler.nonfinite) > 0


def test_channels_last_labels_agree(tokenizer_and_views):
    tok, views = tokenizer_and_views
    cl = DiscreteVAE(tok.arch).eval()
    cl.load_state_dict(tok.state_dict())
    labeler = Labeler(cl, "fp32", channels_last=True)
    assert labeler.agreement(views) >= 0.99  # not bitwise: another summation order
