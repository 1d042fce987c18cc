"""Inputs the pretraining runs of these tests share: 72 real Fashion-MNIST images and an untrained tiny tokenizer."""
import pytest

from beit_scale.data import export_fashion_mnist
from beit_scale.tokenizers import DiscreteVAE, DVAEArch


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """(ImageFolder of 72 training images, tokenizer file with an 8x8 grid at 32 px and 16 codes)."""
    from beit_scale.checkpoint.tokenizer_file import save_tokenizer

    root = tmp_path_factory.mktemp("pretrain_inputs")
    model = DiscreteVAE(DVAEArch(vocab_size=16, input_size=32, downsample=4, hidden_dim=8, codebook_dim=8))
    save_tokenizer(model, model.state_dict(), root / "tok.safetensors")
    return export_fashion_mnist(root, "train", limit=72), root / "tok.safetensors"
