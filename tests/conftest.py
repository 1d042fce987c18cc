"""Shared fixtures: small, made by the tests."""
import pytest
import torch


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add OpenMP barriers (seconds on a busy 2-CPU machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shards_of(tmp_path_factory):
    """Factory: the tar shards `beit-scale shard` makes of an image folder, converted once per session."""
    from beit_scale.data import write_shards

    made = {}

    def make(folder, shard_size_mb: float = 0.05):
        key = (str(folder), shard_size_mb)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("shards")
            write_shards(folder, made[key], shard_size_mb, workers=2)
        return made[key]

    return make
