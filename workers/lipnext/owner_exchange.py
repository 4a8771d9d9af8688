"""Moves row-sharded matrices to one owner rank each and back.

Matrix functions (exp, polar) cannot be applied to a shard, so the manifold
optimizer sends every orthogonal matrix, with its gradient and optimizer
state, to one owner rank, updates it there and sends the rows back. Every
field is a 2-D tensor sharded on dim 0 the way FSDP2 shards parameters
(torch.chunk: ceil(rows / world) rows per rank, the last ranks shorter or
empty). One all_to_all_single carries every matrix of a step each way; each
rank's piece of a matrix is padded to the same length so split sizes are
known to every rank without a handshake. Every buffer is allocated on the
shards' device: NCCL moves only CUDA tensors, and a buffer elsewhere would
move the update there (on the meta device the collective silently does nothing).
"""

import heapq
import math

import torch
import torch.distributed as dist

Shape = tuple[int, int]


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank per square-ish matrix of side `sizes[i]`: largest first onto
    the least-loaded rank, balancing the n^3 cost of the matrix functions."""
    owners = [0] * len(sizes)
    loads = [(0, rank) for rank in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + sizes[i] ** 3, rank))
    return owners


def shard_rows(rows: int, world: int, rank: int) -> slice:
    """The rows FSDP2 (torch.chunk along dim 0) gives to `rank`."""
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    return slice(start, min(start + chunk, rows))


def _piece_len(shapes: list[Shape], world: int) -> int:
    return sum(math.ceil(r / world) * c for r, c in shapes)


def _pack(tensors: list[torch.Tensor], shapes: list[Shape], world: int, out: torch.Tensor) -> None:
    offset = 0
    for t, (r, c) in zip(tensors, shapes):
        out[offset : offset + t.numel()] = t.reshape(-1)
        offset += math.ceil(r / world) * c


def _unpack(piece: torch.Tensor, shapes: list[Shape], world: int, rank: int) -> list[torch.Tensor]:
    tensors, offset = [], 0
    for r, c in shapes:
        rows = shard_rows(r, world, rank)
        n = rows.stop - rows.start
        tensors.append(piece[offset : offset + n * c].view(n, c))
        offset += math.ceil(r / world) * c
    return tensors


def _exchange(send: list[list[torch.Tensor]], recv_lens: list[int], dtype, device, group) -> list[torch.Tensor]:
    """send[d]: flat pieces for rank d, in order; returns what each rank sent us."""
    flat = [p for pieces in send for p in pieces]
    inp = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(recv_lens), dtype=dtype, device=device)
    dist.all_to_all_single(out, inp, recv_lens, [sum(p.numel() for p in pieces) for pieces in send], group=group)
    return list(out.split(recv_lens))


def gather_to_owners(
    local: list[list[torch.Tensor]],
    shapes: list[list[Shape]],
    owners: list[int],
    group=None,
    out: dict[int, list[torch.Tensor]] | None = None,
) -> dict[int, list[torch.Tensor]]:
    """Matrix i's fields, each given as this rank's row shard of global shape
    shapes[i][f], arrive whole on rank owners[i]: {i: [field, ...]} there,
    written into out[i] when given (e.g. slices of a stack of matrices)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = [i for i, o in enumerate(owners) if o == rank]
    dtype, device = local[0][0].dtype, local[0][0].device
    send = [[] for _ in range(world)]
    for i, owner in enumerate(owners):
        piece = torch.zeros(_piece_len(shapes[i], world), dtype=dtype, device=device)
        _pack(local[i], shapes[i], world, piece)
        send[owner].append(piece)
    received = _exchange(send, [sum(_piece_len(shapes[i], world) for i in mine)] * world, dtype, device, group)
    if out is None:
        out = {i: [torch.empty(shape, dtype=dtype, device=device) for shape in shapes[i]] for i in mine}
    for source, buf in enumerate(received):
        for i, piece in zip(mine, buf.split([_piece_len(shapes[i], world) for i in mine])):
            for whole, rows in zip(out[i], _unpack(piece, shapes[i], world, source)):
                whole[shard_rows(whole.shape[0], world, source)] = rows
    return out


def scatter_from_owners(
    full: dict[int, list[torch.Tensor]],
    shapes: list[list[Shape]],
    owners: list[int],
    dtype: torch.dtype,
    device: torch.device,
    group=None,
) -> list[list[torch.Tensor]]:
    """The inverse of gather_to_owners: every rank gets its row shard of each
    field of every matrix back from the matrix's owner (a rank may own none,
    hence the explicit dtype and device)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    send = [[] for _ in range(world)]
    for dest in range(world):
        for i in sorted(full):
            piece = torch.zeros(_piece_len(shapes[i], world), dtype=dtype, device=device)
            _pack([t[shard_rows(t.shape[0], world, dest)] for t in full[i]], shapes[i], world, piece)
            send[dest].append(piece)
    recv_lens = [sum(_piece_len(shapes[i], world) for i, o in enumerate(owners) if o == src) for src in range(world)]
    received = _exchange(send, recv_lens, dtype, device, group)
    local: list[list[torch.Tensor]] = [[] for _ in owners]
    for source, buf in enumerate(received):
        theirs = [i for i, o in enumerate(owners) if o == source]
        for i, piece in zip(theirs, buf.split([_piece_len(shapes[i], world) for i in theirs])):
            local[i] = _unpack(piece, shapes[i], world, rank)
    return local
