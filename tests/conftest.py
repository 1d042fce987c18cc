"""Shared fixtures: small, made by the tests."""
import pytest


@pytest.fixture
def tiny_tokenizer_file(tmp_path):
    """Factory: write an untrained dVAE tokenizer file with the given view size and downsampling."""
    from beit_scale.checkpoint.tokenizer_file import save_tokenizer
    from beit_scale.tokenizers import DiscreteVAE, DVAEArch

    def make(input_size: int, downsample: int, vocab_size: int = 16):
        model = DiscreteVAE(DVAEArch(vocab_size=vocab_size, input_size=input_size, downsample=downsample,
                                     hidden_dim=8, codebook_dim=8, num_res_blocks=0))
        path = tmp_path / f"tok_{input_size}_{downsample}.safetensors"
        save_tokenizer(model, model.state_dict(), path)
        return path

    return make
