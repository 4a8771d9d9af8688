"""Row-sharded matrices travel whole to one owner rank each and back as shards,
in buffers on the shards' own device (real gloo ranks)."""

import torch
import torch.distributed as dist

from lipnext.owner_exchange import gather_to_owners, scatter_from_owners, shard_rows
from lipnext.ranks import run_ranks

# 7 rows on 3 ranks: shards of 3, 3 and 1 rows; 2 rows: shards of 1, 1 and 0.
SHAPES = [[(7, 5), (5, 5)], [(2, 6), (6, 6)], [(4, 4), (4, 4)]]
OWNERS = [2, 2, 0]  # rank 1 owns nothing


def _matrices():
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(shape, generator=g) for shape in fields] for fields in SHAPES]


def _round_trip(default_device: str):
    """Gathers every matrix's fields to its owner, negates them there and
    scatters them back, with factory functions defaulting to default_device."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local = [[t[shard_rows(t.shape[0], world, rank)] for t in fields] for fields in _matrices()]
    with torch.device(default_device):
        whole = gather_to_owners(local, SHAPES, OWNERS)
        negated = {i: [-t for t in fields] for i, fields in whole.items()}
        back = scatter_from_owners(negated, SHAPES, OWNERS, torch.float32, torch.device("cpu"))
    return whole, back


def test_matrices_arrive_whole_on_their_owners_and_go_back_as_shards():
    expected = _matrices()
    for rank, (whole, back) in enumerate(run_ranks(_round_trip, 3, "cpu")):
        assert sorted(whole) == [i for i, owner in enumerate(OWNERS) if owner == rank]
        for i, fields in whole.items():
            for got, want in zip(fields, expected[i]):
                assert torch.equal(got, want)
        for fields, want_fields in zip(back, expected):
            for got, want in zip(fields, want_fields):
                assert torch.equal(got, -want[shard_rows(want.shape[0], 3, rank)])


def test_every_buffer_lives_on_the_shards_device():
    """With factory functions defaulting to the meta device, a buffer made
    without device=... lands there and the gloo collective silently moves
    nothing (what a bare torch.zeros(n) did: on a GPU it would be a CPU buffer
    that NCCL cannot move). The exchange must still deliver exact CPU tensors."""
    expected = _matrices()
    for rank, (whole, back) in enumerate(run_ranks(_round_trip, 3, "meta")):
        for i, fields in whole.items():
            for got, want in zip(fields, expected[i]):
                assert got.device.type == "cpu" and torch.equal(got, want)
        for fields, want_fields in zip(back, expected):
            for got, want in zip(fields, want_fields):
                assert got.device.type == "cpu" and torch.equal(got, -want[shard_rows(want.shape[0], 3, rank)])
