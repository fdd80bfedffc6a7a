"""Sharded top-k over :mod:`torch.distributed`: exact top-k, k-hot masks, sigmoid top-k and
sampling of a tensor split along the top-k dimension across the ranks of a process group.

The tensor is split along ``dim`` in rank order (an LLM's vocabulary across tensor-parallel
ranks, a retrieval index across machines); shards may differ in length. Every function is
called by every rank of the group with its own shard, or with a DTensor placed ``Shard(dim)``
on one mesh dimension (the output then comes back as a DTensor with the right placement,
without redistributing the input to ``Replicate``). Communication never grows with the length
of the dimension:

* one small all-gather of metadata first (shapes, ``dim``, ``k``, ...), so that bad input on
  any rank raises the same error on every rank instead of leaving the others waiting in a
  collective (no hang); it also gives the shard lengths, hence the global offsets;
* :func:`sharded_topk`, :func:`sharded_topk_mask`, :func:`sharded_sample` with ``k``: one
  all-gather of each rank's top ``k`` candidates (values and global indices packed in one byte
  buffer): ``O(k · ranks · batch)``; :func:`sharded_sample` without ``k``: one all-gather of three
  numbers per row and rank, and one all-reduce of the ids;
* :func:`sharded_sigmoid_topk`: one all-gather of per-row statistics, then one all-reduce of
  three per-row sums per solver step (typically 3-6), and one all-reduce backward.

The functions run eagerly (they talk to the process group, and the sigmoid solver's number of
rounds depends on the data): they are not meant for ``torch.compile`` or meta tensors.

Ranking rules are those of :func:`khot.topk_mask` on the concatenated tensor: among equal
values the lower *global* index wins, and NaN ranks above ``+inf``. The local selection is
:func:`khot.select_topk` (:func:`khot.topk_mask` for the smallest); the merge sorts the
gathered candidates, listed in increasing global index, with a stable sort by value (so equal
values keep the lower index first).

Example (a single-process group, so that it runs anywhere; with more ranks each passes its
own shard and gets the same replicated answer):

>>> import torch, torch.distributed as dist, khot.distributed
>>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
>>> x = torch.tensor([[0.5, 2.0, -1.0, 2.0, 7.0]])
>>> values, indices = khot.distributed.sharded_topk(x, 3)
>>> values, indices
(tensor([[7., 2., 2.]]), tensor([[4, 1, 3]]))
>>> khot.distributed.sharded_topk_mask(x, 2)
tensor([[False,  True, False, False,  True]])
>>> p = khot.distributed.sharded_sigmoid_topk(x, 2.0, temperature=1.0)
>>> round(p.sum().item(), 6)
2.0
>>> khot.distributed.sharded_sample(x, k=1)
tensor([4])
>>> dist.destroy_process_group()
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

import khot

from ._checks import check_flag, check_positive, check_range, check_tensor, normalize_dim

__all__ = ["sharded_topk", "sharded_topk_mask", "sharded_sigmoid_topk", "sharded_sample"]

_ERRORS = {"TypeError": TypeError, "ValueError": ValueError}


@dataclass
class _Shard:
    """This rank's shard of a tensor split along ``dim``, moved to the last dimension."""

    local: Tensor  # (..., n_r): the shard with dim moved last
    dim: int  # the sharded dimension of the caller's tensor (non-negative)
    group: object
    rank: int
    lengths: list  # n_r of every rank, in rank order
    dtensor: object = None  # (mesh, placements, mesh_dim, global shape) for a DTensor input

    @property
    def world(self) -> int:
        return len(self.lengths)

    @property
    def n(self) -> int:
        return sum(self.lengths)

    @property
    def offset(self) -> int:
        return sum(self.lengths[: self.rank])

    @property
    def rows(self) -> int:
        return math.prod(self.local.shape[:-1])


def _unwrap(x, dim, group):
    """``(local tensor, group, DTensor info)``: a DTensor must be ``Shard(dim)`` on one mesh dimension."""
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    except ImportError:  # torch without DTensor: only plain tensors
        return x, group, None
    if not isinstance(x, DTensor):
        return x, group, None
    if group is not None:
        raise TypeError("group must be None when x is a DTensor (its device mesh gives the group)")
    d = normalize_dim(dim, x.dim())
    along = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim == d]
    if len(along) != 1 or any(isinstance(p, Partial) or not isinstance(p, (Shard, Replicate)) for p in x.placements):
        raise ValueError(
            f"x is a DTensor with placements {tuple(x.placements)}: expected Shard({d}) (the dimension dim={dim} "
            "selects along) on exactly one mesh dimension and Replicate or Shard of other dimensions on the rest"
        )
    return x.to_local(), x.device_mesh.get_group(along[0]), (x.device_mesh, tuple(x.placements), along[0], x.shape)


def _rewrap(out: Tensor, shard: _Shard, dim_size: int | None, replicated: bool = True, drop_dim: bool = False):
    """``out`` (this rank's result, dim moved last) with the caller's layout: the sharded
    dimension back in place (or dropped), and as a DTensor when the input was one: ``dim_size``
    is then the global size of that dimension in the result (``None``: the input's), and
    ``replicated`` says whether the result is the same on the sharded mesh dimension."""
    out = out if drop_dim else out.movedim(-1, shard.dim)
    if shard.dtensor is None:
        return out
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, placements, mesh_dim, shape = shard.dtensor
    placements = list(placements)
    if replicated:
        placements[mesh_dim] = Replicate()
    if drop_dim:  # the selected dimension is gone: shards of later dimensions move down one
        placements = [Shard(p.dim - (p.dim > shard.dim)) if isinstance(p, Shard) else p for p in placements]
        shape = shape[: shard.dim] + shape[shard.dim + 1 :]
    elif dim_size is not None:
        shape = shape[: shard.dim] + (dim_size,) + shape[shard.dim + 1 :]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(out, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)


def _digest(t: Tensor) -> str:
    """A fingerprint of a (small, replicated) tensor argument, to check that the ranks agree on it."""
    data = t.detach().cpu().contiguous().reshape(-1)
    return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha1(bytes(data.view(torch.uint8).tolist())).hexdigest()[:16]


def _agreed(value):
    """How an argument that every rank must pass alike is compared across ranks: JSON data (a tensor
    by its digest, a number of any type as a Python int or float, anything else by its repr)."""
    if isinstance(value, Tensor):
        return _digest(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return repr(value)


def _shard(name: str, x, dim, group, check) -> _Shard:
    """Validate this rank's arguments and agree on them with every rank, in one small all-gather.

    ``check(local, dim)`` checks the op's own arguments locally and returns a dict of the
    values every rank must pass alike. A local error is not raised at once (the other ranks
    would wait in the collective forever): it travels in the metadata, and every rank raises it.
    """
    x, group, dtensor = _unwrap(x, dim, group)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} needs an initialized process group (torch.distributed.init_process_group)")
    group = dist.group.WORLD if group is None else group
    error, meta = None, None
    try:
        check_tensor("x", x)
        d = normalize_dim(dim, x.dim())
        same = {arg: _agreed(value) for arg, value in check(x, d).items()}  # JSON data: a NumPy number would not serialise
        shape = tuple(x.shape[:d]) + (None,) + tuple(x.shape[d + 1 :])
        meta = (shape, d, x.shape[d] if x.dim() else 1, str(x.dtype), x.device.type, same)
    except Exception as e:  # noqa: BLE001 (raised below, on every rank)
        error = (type(e).__name__, str(e))
    gathered = _all_gather_json((error, meta), group)
    for r, (err, _) in enumerate(gathered):
        if err is not None:
            raise _ERRORS.get(err[0], RuntimeError)(f"{name}: rank {r}: {err[1]}")
    metas = [m for _, m in gathered]
    for what, i in (("dim", 1), ("dtype", 3), ("device type", 4), ("shape (except along dim)", 0)):
        values = [m[i] for m in metas]
        if any(v != values[0] for v in values):
            raise ValueError(f"{name}: the ranks disagree on the {what} of x: {_by_rank(values)}")
    for arg in metas[0][5]:
        values = [m[5][arg] for m in metas]
        if any(v != values[0] for v in values):
            raise ValueError(f"{name}: every rank must pass the same {arg}, got {_by_rank(values)}")
    local = x.reshape(1) if x.dim() == 0 else x.movedim(metas[0][1], -1)
    return _Shard(local, metas[0][1], group, dist.get_rank(group), [m[2] for m in metas], dtensor)


_META_BYTES = 2048  # room for one rank's metadata (shapes, arguments, an error message)


def _all_gather_json(value, group) -> list:
    """Every rank's ``value`` (JSON data), in one all-gather of a fixed-size byte buffer."""
    text = json.dumps(value, default=repr)  # never raise here: the other ranks would wait in the collective
    if len(text.encode()) > _META_BYTES:  # only a long error message can be this long: cut it
        error, meta = value
        text = json.dumps(((error[0], error[1][: _META_BYTES // 8] + " ..."), meta), default=repr)
    data = text.encode()
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    buffer = torch.zeros(_META_BYTES, dtype=torch.uint8)
    buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty(_META_BYTES, dtype=torch.uint8, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, buffer.to(device), group=group)
    return [json.loads(bytes(p.cpu().tolist()).rstrip(b"\0").decode()) for p in parts]


def _by_rank(values) -> str:
    return ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))


def _check_k(k, low: int = 0) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
    if k < low:
        raise ValueError(f"k={k} is out of range: expected k >= {low}")
    return int(k)


def _check_global_k(name: str, k: int, shard: _Shard) -> None:
    if k > shard.n:
        raise ValueError(
            f"{name}: k={k} is out of range: expected k <= {shard.n} (the length of dim {shard.dim} summed over the "
            f"ranks, {' + '.join(map(str, shard.lengths))})"
        )


def _all_gather_rows(buffer: Tensor, shard: _Shard) -> Tensor:
    """All-gather a ``(rows, width)`` buffer of every rank into ``(ranks, rows, width)``."""
    out = buffer.new_empty((shard.world,) + tuple(buffer.shape))
    if buffer.numel():  # the same on every rank (the shapes were agreed on)
        dist.all_gather(list(out.unbind(0)), buffer.contiguous(), group=shard.group)
    return out


def _as_bytes(t: Tensor) -> Tensor:
    """A ``(rows, m)`` tensor as ``(rows, m * itemsize)`` bytes."""
    if t.numel() == 0:  # an empty tensor's strides need not allow the view
        return torch.empty((*t.shape[:-1], t.shape[-1] * t.element_size()), dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8)


def _from_bytes(b: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of :func:`_as_bytes` (on any slice of the bytes: the result is a fresh tensor)."""
    size = torch.empty((), dtype=dtype).element_size()
    out = torch.empty(*b.shape[:-1], b.shape[-1] // size, dtype=dtype, device=b.device)
    out.view(torch.uint8).copy_(b)
    return out


def _candidates(shard: _Shard, k: int, largest: bool, extra: Tensor | None = None):
    """The global top ``k`` of every row, sorted (ties: lower global index first), replicated
    on every rank: ``(values, indices)`` of shape ``(rows, k)``, and ``extra`` of group rank 0.

    One all-gather: every rank sends its local top ``min(k, n_r)`` (by :func:`khot.select_topk`
    or :func:`khot.topk_mask`, so ties and NaN follow khot's rules), values and global indices in one byte buffer (with
    ``extra``, a per-row float64, riding along); the merge is a stable sort of the candidates
    listed in increasing global index.
    """
    rows = shard.rows
    x = shard.local.reshape(rows, shard.local.shape[-1])
    width = min(k, max(shard.lengths))  # what every rank sends (the shorter ones pad)
    mine = min(k, x.shape[-1])
    if largest:  # select_topk reads the indices off its candidates, without a mask of x's size
        position = khot.select_topk(x.detach().unsqueeze(-1), x.detach(), mine, sorted=False)[1]
    else:
        position = khot.topk_mask(x, mine, -1, largest=False).nonzero()[:, -1].view(rows, mine)
    values = x.gather(-1, position)
    index = position + shard.offset
    if mine < width:
        values = torch.cat([values, values.new_zeros(rows, width - mine)], -1)
        index = torch.cat([index, index.new_zeros(rows, width - mine)], -1)
    parts = [_as_bytes(values), _as_bytes(index)]
    if extra is not None:
        parts.append(_as_bytes(extra.to(torch.float64).unsqueeze(-1)))
    gathered = _all_gather_rows(torch.cat(parts, -1), shard)
    cut = width * x.element_size()
    all_values = _from_bytes(gathered[..., :cut], x.dtype)
    all_index = _from_bytes(gathered[..., cut : cut + 8 * width], torch.int64)
    keep = [min(k, n) for n in shard.lengths]
    all_values = torch.cat([v[:, :m] for v, m in zip(all_values, keep)], -1)
    all_index = torch.cat([i[:, :m] for i, m in zip(all_index, keep)], -1)
    order = torch.sort(all_values, stable=True, dim=-1, descending=largest).indices[:, :k]
    rank0 = _from_bytes(gathered[0, :, cut + 8 * width :], torch.float64).reshape(rows) if extra is not None else None
    return all_values.gather(-1, order), all_index.gather(-1, order), rank0


def _local_positions(indices: Tensor, shard: _Shard) -> tuple[Tensor, Tensor]:
    """Global indices as positions in this rank's shard, and whether they lie in it."""
    local = indices - shard.offset
    return local, (local >= 0) & (local < shard.local.shape[-1])


def sharded_topk(x: Tensor, k: int, dim: int = -1, *, group=None, largest: bool = True):
    """The global top ``k`` of a tensor split along ``dim`` across the ranks of ``group``.

    Args:
        x: this rank's shard (a real tensor; shards may differ in length along ``dim``, other
            dimensions must agree), or a DTensor placed ``Shard(dim)`` on one mesh dimension.
        k: an int, ``0 <= k <= N`` with ``N`` the length of ``dim`` summed over the ranks; the
            same on every rank.
        dim: the sharded dimension, the one to select along.
        group: the process group (default: the world); ``None`` for a DTensor.
        largest: the largest (``True``) or the smallest entries.

    Returns:
        ``(values, indices)`` of ``x``'s shape with ``dim`` of size ``k``, the same on every
        rank: values sorted best first, ``indices`` int64 *global* positions along ``dim``
        (equal values: lower index first; NaN ranks above ``+inf``), exactly what
        :func:`torch.sort` (stable) of the concatenated tensor gives in its first ``k``
        places. A DTensor input gives ``Replicate()`` outputs on the sharded mesh dimension.
        ``values`` is differentiable: each rank's shard gets the gradient of the values it holds
        (every rank runs the same backward on the replicated values).

    Communication: a metadata all-gather and one all-gather of ``min(k, max n_r)`` values and
    indices per row and rank. Example: see :mod:`khot.distributed`.
    """

    def check(local, d):
        return {"k": _check_k(k), "largest": check_flag("largest", largest)}

    shard = _shard("sharded_topk", x, dim, group, check)
    _check_global_k("sharded_topk", k, shard)
    values, indices, _ = _candidates(shard, k, largest)
    if shard.local.requires_grad and shard.local.shape[-1]:  # this rank's own values, differentiably
        local, mine = _local_positions(indices, shard)
        own = shard.local.reshape(shard.rows, -1).gather(-1, local.clamp(0, shard.local.shape[-1] - 1))
        values = torch.where(mine, own, values)
    batch = shard.local.shape[:-1]
    return tuple(_rewrap(t.reshape(*batch, k), shard, k) for t in (values, indices))


def sharded_topk_mask(x: Tensor, k: int, dim: int = -1, *, group=None, largest: bool = True) -> Tensor:
    """This rank's slice of the k-hot mask of the whole tensor split along ``dim`` (see
    :func:`sharded_topk` for the arguments): exactly ``khot.topk_mask(cat(shards), k, dim)``
    cut back into shards. A DTensor input gives a DTensor with the input's placements.
    Example: see :mod:`khot.distributed`.
    """

    def check(local, d):
        return {"k": _check_k(k), "largest": check_flag("largest", largest)}

    shard = _shard("sharded_topk_mask", x, dim, group, check)
    _check_global_k("sharded_topk_mask", k, shard)
    _, indices, _ = _candidates(shard, k, largest)
    n, rows = shard.local.shape[-1], shard.rows
    local, mine = _local_positions(indices, shard)
    flat = torch.arange(rows, device=local.device).unsqueeze(-1) * n + local
    mask = torch.zeros(rows * n + 1, dtype=torch.bool, device=local.device)  # the last slot takes other ranks' picks
    mask[torch.where(mine, flat, rows * n)] = True
    return _rewrap(mask[:-1].view(shard.local.shape), shard, None, replicated=False)


# ---------------------------------------------------------------------------------------------
# sigmoid top-k


def _key(c: Tensor) -> Tensor:
    """float64 as int64 in the same order (so that bisection can count representable values)."""
    bits = c.view(torch.int64)
    return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)


def _unkey(key: Tensor) -> Tensor:
    return (key ^ ((key >> 63) & 0x7FFFFFFFFFFFFFFF)).view(torch.float64)


def _width(lo: Tensor, hi: Tensor) -> Tensor:
    """About half the number of float64 values in ``[lo, hi]`` (halved so that it cannot overflow)."""
    return (_key(hi) >> 1) - (_key(lo) >> 1)


def _bisect(lo: Tensor, hi: Tensor) -> Tensor:
    """A point strictly inside ``(lo, hi)`` (when there is one) that leaves at most about 3/4 of the
    float64 values of the bracket on either side: the midpoint in ``asinh`` space (good for wide
    brackets), moved into the middle half of the bracket counted in representable values."""
    klo, khi = _key(lo), _key(hi)
    quarter = ((khi >> 2) - (klo >> 2)).clamp(min=1)
    mid = _key(torch.sinh((torch.asinh(lo) + torch.asinh(hi)) / 2).nan_to_num(0.0))
    return _unkey(torch.minimum(torch.maximum(mid, klo + quarter), khi - quarter).clamp(klo, khi))


def _solve_c(a: Tensor, finite: Tensor, kf: Tensor, n_fin: Tensor, lo: Tensor, hi: Tensor, c: Tensor,
             active: Tensor, shard: _Shard) -> Tensor:
    """``c`` per row with ``Σ sigmoid(a + c) = kf`` over the finite ``a`` of the whole row.

    Every evaluation is one all-reduce of three per-row sums. A Newton step on
    ``φ(c) = log f(c) - log kf`` (``log(n - f) - log(n - kf)`` for rows with ``kf > n / 2``, where
    those sums are accurate) is taken when it lands inside the bracket, unless the previous step
    was a Newton step that did not halve ``|φ|``: then, and outside the bracket, a bisection step
    (:func:`_bisect`). Stops per row at ``|Σ p - kf| <= 1e-12 max(1, min(kf, n - kf))`` or when no
    float64 lies inside the bracket. Provably finite, with no iteration cap: every bisection keeps
    at most ~3/4 of the bracket's float64 values (so there are at most ~160), and between two of
    them Newton halves ``|φ|`` (below ~750) at every step but the last until it is below 5e-13,
    where the tolerance holds: at most ~55 steps. Typical inputs take 3-6 evaluations.
    """
    upper = kf > n_fin / 2
    target = torch.where(upper, n_fin - kf, kf)
    tol = 1e-12 * target.clamp(min=1)
    newton_last = torch.zeros_like(c, dtype=torch.bool)
    last_phi = torch.full_like(c, math.inf)
    while True:
        z = a + c.unsqueeze(-1)
        s = torch.where(finite, z.sigmoid(), 0)
        t = torch.where(finite, (-z).sigmoid(), 0)
        sums = torch.stack([s.sum(-1), t.sum(-1), (s * t).sum(-1)], -1)
        if shard.world > 1:
            dist.all_reduce(sums, group=shard.group)
        f_lo, f_hi, deriv = sums.unbind(-1)  # Σ p, Σ (1 - p), Σ p (1 - p)
        f = torch.where(upper, f_hi, f_lo)  # decreasing in c for upper rows
        below = torch.where(upper, f > target, f < target)
        lo = torch.where(active & below, c, lo)
        hi = torch.where(active & ~below, c, hi)
        done = ~active | ~((f - target).abs() > tol) | (torch.nextafter(lo, hi) >= hi)
        if bool(done.all()):
            return c
        phi = f.log() - target.log()
        newton = c - torch.where(upper, -phi, phi) * f / deriv
        good = (newton > lo) & (newton < hi) & ~(newton_last & ~(2 * phi.abs() <= last_phi))
        newton_last, last_phi = good, phi.abs()
        c = torch.where(done, c, torch.where(good, newton, _bisect(lo, hi)))


class _ShardedSigmoidTopK(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, k: Tensor, tau: Tensor, shard: _Shard) -> Tensor:
        a = x.to(torch.float64) / tau.unsqueeze(-1)
        finite = a.isfinite()
        stats = torch.stack(
            [
                torch.where(finite, a, -math.inf).amax(-1) if a.shape[-1] else a.new_full(a.shape[:-1], -math.inf),
                torch.where(finite, -a, -math.inf).amax(-1) if a.shape[-1] else a.new_full(a.shape[:-1], -math.inf),
                (a == math.inf).sum(-1, dtype=torch.float64),
                (a == -math.inf).sum(-1, dtype=torch.float64),
                a.isnan().sum(-1, dtype=torch.float64),
                torch.where(finite, a, 0).sum(-1),
                torch.where(finite, a, 0).square().sum(-1),
            ],
            -1,
        )
        stats = _all_gather_rows(stats.reshape(-1, 7), shard).view(shard.world, *a.shape[:-1], 7)
        amax, neg_amin = stats[..., 0].amax(0), stats[..., 1].amax(0)
        n_plus, n_minus, n_nan, total, squares = stats[..., 2:].sum(0).unbind(-1)
        n = float(shard.n)
        n_fin = n - n_plus - n_minus
        kf = k - n_plus  # the +inf entries take p = 1, the -inf ones p = 0
        edge = (k <= 0) | (k >= n)  # exactly 0 or 1 everywhere, as sigmoid_topk
        none, all_ = kf <= 0, kf >= n_fin  # the finite entries get p = 0 (or 1)
        active = ~(edge | none | all_ | (n_nan > 0))
        safe_k = torch.where(active, kf, 1.0)
        safe_n = torch.where(active, n_fin, 2.0)
        logit = (safe_k / (safe_n - safe_k)).log()
        lo = torch.where(active, logit - amax, 0.0)
        hi = torch.where(active, logit + neg_amin, 0.0)
        mean = total / safe_n
        spread = (1 + math.pi / 8 * (squares / safe_n - mean.square()).clamp(min=0)).sqrt()
        start = torch.minimum(torch.maximum(logit * spread - mean, lo), hi)  # the probit approximation
        c = _solve_c(a, finite, kf, n_fin, lo, hi, start, active, shard)
        p = torch.sigmoid(a + c.unsqueeze(-1))
        p = torch.where(none.unsqueeze(-1), (a == math.inf).double(), p)
        p = torch.where(all_.unsqueeze(-1), (a != -math.inf).double(), p)
        p = torch.where(edge.unsqueeze(-1), (k / n).unsqueeze(-1).expand_as(p), p)
        p = torch.where((n_nan > 0).unsqueeze(-1), math.nan, p)
        return p.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, k, tau, shard = inputs
        ctx.shard = shard
        ctx.save_for_backward(output, x, tau)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        """One all-reduce of per-row sums: with ``w = p (1 - p) / τ`` (``a`` below), ``S = Σ w``
        and ``m = Σ w g / S`` over the whole row, ``grad_x = w (g - m)``, ``grad_k = m`` and
        ``grad_τ = (m Σ w x - Σ w g x) / τ`` (:mod:`khot.relaxed.sigmoid`'s formulas)."""
        p, x, tau = ctx.saved_tensors
        p, g = p.double(), grad.double()
        a = p * (1 - p) / tau.double().unsqueeze(-1)
        xf = torch.where(a > 0, x, 0).double()  # w = 0 where x = ±inf
        sums = torch.stack([a.sum(-1), (a * g).sum(-1), (a * xf).sum(-1), (a * g * xf).sum(-1)], -1)
        if ctx.shard.world > 1:
            dist.all_reduce(sums, group=ctx.shard.group)
        s, sg, sx, sgx = sums.unbind(-1)
        m = sg / torch.where(s > 0, s, 1)
        grad_x = (a * (g - m.unsqueeze(-1))).to(grad.dtype)
        grad_k = m if ctx.needs_input_grad[1] else None
        grad_tau = ((m * sx - sgx) / tau.double()).to(tau.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_k, grad_tau, None


def _check_per_row(name: str, value, batch: torch.Size, device: torch.device) -> None:
    if isinstance(value, Tensor):
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but x is on {device}")
        try:
            torch.broadcast_to(value, batch)
        except RuntimeError:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, which does not broadcast to the shape of x with dim "
                f"removed, {tuple(batch)}"
            ) from None


def sharded_sigmoid_topk(x: Tensor, k, dim: int = -1, *, temperature, group=None) -> Tensor:
    """This rank's slice of :func:`khot.sigmoid_topk` of the whole tensor split along ``dim``.

    ``p = sigmoid(x / τ + c)`` with one ``c`` per row such that ``p`` sums to ``k`` over the
    whole row (every rank's shard). ``c`` is solved in float64 with all-reduces of per-rank
    sums: one all-gather of per-row statistics (extremes, ±inf counts, moments) gives a bracket
    and a start, then a safeguarded Newton iteration (each step one all-reduce of three sums;
    typically 3-6 steps, and provably finite: see ``_solve_c``) reaches ``|Σ p - k| <= 1e-12
    max(1, min(k, n - k))`` or adjacent floats. Same rules as :func:`khot.sigmoid_topk`: ``+inf``
    gets ``p = 1``, ``-inf`` ``p = 0``, a NaN makes its row NaN, ``k = 0`` and ``k = n`` give
    exactly 0 and 1.

    Args:
        x: this rank's floating-point shard, or a DTensor placed ``Shard(dim)``.
        k: ``0 <= k <= N`` (``N``: the length of ``dim`` summed over the ranks), a number or a
            tensor of per-row values (broadcastable to ``x``'s shape without ``dim``); the same
            on every rank.
        dim: the sharded dimension.
        temperature: ``τ > 0``, a number or a per-row tensor; the same on every rank.
        group: the process group (default: the world); ``None`` for a DTensor.

    Returns:
        ``p`` shaped like ``x`` (a DTensor with ``x``'s placements for a DTensor input).
        Differentiable in ``x``, a tensor ``k`` and a tensor ``temperature``; the backward makes
        one all-reduce, so every rank must run it. Example: see :mod:`khot.distributed`.
    """

    def check(local, d):
        check_tensor("x", local, floating=True)
        batch = local.shape[:d] + local.shape[d + 1 :]
        if isinstance(k, Tensor):
            if k.dtype == torch.bool or k.is_complex():
                raise TypeError(f"k must be a number or a real tensor, got a tensor of dtype {k.dtype}")
        elif isinstance(k, bool) or not isinstance(k, numbers.Real):
            raise TypeError(f"k must be a number or a real tensor, got {type(k).__name__} {k!r}")
        elif not k >= 0:
            raise ValueError(f"k={k} is out of range: expected k >= 0")
        _check_per_row("k", k, batch, local.device)
        check_positive("temperature", temperature)
        _check_per_row("temperature", temperature, batch, local.device)
        return {"k": k, "temperature": temperature}

    shard = _shard("sharded_sigmoid_topk", x, dim, group, check)
    batch = shard.local.shape[:-1]
    n = shard.n
    if isinstance(k, Tensor):
        kt = check_range(torch.broadcast_to(k, batch), "k", 0, n, what=f"lie in [0, {n}] (the global length of dim)")
        kt = kt if kt.is_floating_point() else kt.double()
    else:
        if k > n:
            raise ValueError(
                f"sharded_sigmoid_topk: k={k} is out of range: expected 0 <= k <= {n} (the global length of dim)"
            )
        kt = torch.full(batch, float(k), dtype=torch.float64, device=shard.local.device)
    tau = torch.broadcast_to(torch.as_tensor(temperature, dtype=torch.float64, device=shard.local.device), batch)
    p = _ShardedSigmoidTopK.apply(shard.local, kt, tau, shard)
    return _rewrap(p, shard, None, replicated=False)


# ---------------------------------------------------------------------------------------------
# sampling


def _inverse_cdf(weights: Tensor, point: Tensor) -> Tensor:
    """Per row, the first index whose cumulative weight exceeds ``point`` (``(rows,)``, below the
    row's total weight, which must be positive): an index of positive weight, also where
    rounding puts ``point`` at or past the total."""
    cdf = weights.cumsum(-1)
    point = torch.minimum(point.unsqueeze(-1), torch.nextafter(cdf[:, -1:], cdf.new_zeros(())))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1)


def _full_vocabulary_sample(shard: _Shard, a: Tensor, u: Tensor) -> Tensor:
    """Sample one index per row of ``softmax(a)`` over the whole row: the inverse CDF in global
    index order at rank 0's uniform ``u``. One all-gather of (maximum, mass, u) per row and rank
    tells which rank's mass holds the point; that rank finds the index in its shard; one
    all-reduce (max) gives it to every rank."""
    rows, n = a.shape
    top = a.amax(-1) if n else a.new_full((rows,), -math.inf)
    weights = (a - torch.where(top.isfinite(), top, 0).unsqueeze(-1)).exp()
    bad = (a.isnan() | (a == math.inf)).any(-1).double()
    stats = _all_gather_rows(torch.stack([top, weights.sum(-1), bad, u], -1), shard)  # (ranks, rows, 4)
    if bool(stats[..., 2].any()):
        raise ValueError("sharded_sample: logits must not hold NaN or +inf")
    best = stats[..., 0].amax(0)
    if bool((best == -math.inf).any()):
        raise ValueError("sharded_sample: a row of logits is -inf everywhere (nothing to sample)")
    scale = torch.where(stats[..., 0].isfinite(), (stats[..., 0] - best).exp(), 0)  # rank masses, global units
    cum = (stats[..., 1] * scale).cumsum(0)  # (ranks, rows)
    point = torch.minimum(stats[0, :, 3] * cum[-1], torch.nextafter(cum[-1], cum.new_zeros(())))
    owner = (cum <= point).sum(0)  # the first rank whose cumulative mass passes the point: mass > 0
    ids = torch.full((rows,), -1, dtype=torch.int64, device=a.device)
    mine = owner == shard.rank
    if bool(mine.any()):
        before = torch.where(owner > 0, cum.gather(0, (owner - 1).clamp(min=0).unsqueeze(0)).squeeze(0), 0)
        local = _inverse_cdf(weights[mine] * scale[shard.rank, mine].unsqueeze(-1), (point - before)[mine])
        ids[mine] = local + shard.offset
    if shard.world > 1:
        dist.all_reduce(ids, op=dist.ReduceOp.MAX, group=shard.group)
    return ids


def sharded_sample(logits: Tensor, *, k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
                   generator: torch.Generator | None = None, group=None) -> Tensor:
    """Vocabulary-parallel sampling: one token id per row of logits split along the last dim.

    ``k``: sample among the global top ``k`` logits (top-k sampling); ``top_p`` (needs ``k``):
    then among the fewest of them, best first, whose probability within the top ``k`` reaches
    ``top_p`` (top-k then top-p, as Hugging Face's warpers): the nucleus is therefore bounded by
    ``k`` tokens, and is exact top-p of the whole vocabulary whenever the top ``k`` hold at least
    ``top_p`` of its mass. Neither: sample from ``softmax(logits / temperature)`` over the whole
    vocabulary (exactly, without gathering it: the inverse CDF over the ranks' masses).

    Args:
        logits: this rank's shard ``(..., V_r)`` (or a DTensor placed ``Shard(-1)``), floating
            point; ``-inf`` masks a token, NaN and ``+inf`` are errors.
        k: ``1 <= k <= V``, or ``None``.
        top_p: ``0 < top_p <= 1``, or ``None``.
        temperature: ``> 0``; the logits are divided by it.
        generator: the random source; one float64 uniform per row is drawn on every rank and
            group rank 0's is used, so every rank returns the same ids whatever its generator.
            The result is inverse-CDF sampling of the concatenated logits at the uniforms
            ``torch.rand(rows, generator=..., dtype=torch.float64)`` of rank 0: over the top ``k``
            best first (ties: lower index first), or without ``k`` over the vocabulary in index order.
        group: the process group (default: the world); ``None`` for a DTensor.

    Returns:
        int64 global token ids of shape ``logits.shape[:-1]``, the same on every rank.
        Communication: metadata, then one all-gather of ``k`` candidates per row and rank (or,
        without ``k``, of three numbers per row and rank, and an all-reduce of the ids).
        Example: see :mod:`khot.distributed`.
    """

    def check(local, d):
        check_tensor("logits", local, floating=True)
        if local.dim() == 0:
            raise ValueError("logits must have at least one dimension (the vocabulary), got a 0-d tensor")
        if k is not None:
            _check_k(k, low=1)
        if top_p is not None:
            if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
                raise TypeError(f"top_p must be a number or None, got {type(top_p).__name__} {top_p!r}")
            if not 0 < top_p <= 1:
                raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
            if k is None:
                raise ValueError("top_p needs k: the nucleus is taken within the global top-k candidates (k bounds it)")
        check_positive("temperature", temperature)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        return {"k": k, "top_p": top_p, "temperature": temperature}

    shard = _shard("sharded_sample", logits, -1, group, check)
    batch, rows = shard.local.shape[:-1], shard.rows
    u = torch.rand(rows, generator=generator, dtype=torch.float64, device=shard.local.device)
    if k is None:
        ids = _full_vocabulary_sample(shard, shard.local.reshape(rows, shard.local.shape[-1]).double() / temperature, u)
        return _rewrap(ids.view(batch), shard, None, drop_dim=True)
    _check_global_k("sharded_sample", k, shard)
    values, indices, u = _candidates(shard, k, True, extra=u)
    a = values.double() / temperature
    if bool((a.isnan() | (a == math.inf)).any()):
        raise ValueError("sharded_sample: logits must not hold NaN or +inf")
    if bool((a[:, 0] == -math.inf).any()):
        raise ValueError("sharded_sample: a row of logits is -inf everywhere (nothing to sample)")
    w = (a - a[:, :1]).exp()  # sorted best first: the first is the maximum
    if top_p is not None:
        before = (w.cumsum(-1) - w) / w.sum(-1, keepdim=True)  # mass of the better candidates
        w = torch.where(before < top_p, w, 0)
    pick = _inverse_cdf(w, u * w.sum(-1))
    return _rewrap(indices.gather(-1, pick.unsqueeze(-1)).view(batch), shard, None, drop_dim=True)
