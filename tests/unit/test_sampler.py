"""The sampler's position is a global sample count, so a resumed epoch re-splits over any world size."""
import pytest

from beit_scale.data import ResumableDistributedSampler


def shards(n, world, epoch=3, start=0):
    out = []
    for rank in range(world):
        s = ResumableDistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7, drop_last=True)
        s.set_position(epoch, start)
        out.append(list(s))
    return out


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_the_rest_of_an_epoch_is_the_same_samples_on_any_world_size(saved, resumed):
    n, consumed = 48, 16  # every rank consumed consumed / saved samples
    seen = {i for shard in shards(n, saved) for i in shard[:consumed // saved]}
    rest = shards(n, resumed, start=consumed)
    assert all(len(shard) == (n - consumed) // resumed for shard in rest)  # every rank has the same count
    remaining = [i for shard in rest for i in shard]
    assert len(set(remaining)) == len(remaining) and not seen & set(remaining)  # nothing repeated
    assert seen | set(remaining) == set(range(n))  # nothing lost
    # Each "global batch" of 4 samples per rank holds the same samples as the uninterrupted run on `saved` ranks.
    full = shards(n, saved)
    per = 8 // saved, 8 // resumed
    for b in range((n - consumed) // 8):
        old = {i for shard in full for i in shard[consumed // saved + b * per[0]:consumed // saved + (b + 1) * per[0]]}
        new = {i for shard in rest for i in shard[b * per[1]:(b + 1) * per[1]]}
        assert old == new


def test_a_position_the_ranks_cannot_split_is_refused():
    s = ResumableDistributedSampler(range(48), num_replicas=2, rank=0, shuffle=True, seed=7, drop_last=True)
    with pytest.raises(ValueError, match="the run stopped after 15 samples of epoch 1, which 2 ranks cannot split"):
        s.set_position(1, 15)
