"""Statistics of many records reduced together on their device, brought to the host once per
batch (torch needed): the stats-mode path for CUDA and NPU, with no host synchronisation
inside the forward.

:func:`~precision.runtime.capture.tensorstats.tensor_stats` brings each record's numbers to
the host as it is made (a synchronisation per record: the device drains its queue, then
waits for the host). Here a record costs one launch: a copy of its values (integers as
float64) into a reused device *arena* of its dtype, made of rows of
``C = 1021`` elements (the sketch's bucket count), each record starting a new row, the rest
of its last row left zero. When the arena is full (or at :meth:`DeferredStats.results`),
one batch of row-wise reductions over the whole arena, whatever the number of records in
it, gives every record's statistics into one device tensor, which is copied to pinned host
memory behind an event; the host reads it after the forward. Memory on the device is the
arena (``capacity`` elements, 16M by default: 32 MB in bf16) and the batch's temporaries
(a few times the arena; a record larger than the arena is reduced alone in an arena of its
size).

With ``X`` the arena as ``(rows, C)``, ``keep = isfinite(X) & (X > lowest)`` (``lowest``
the record dtype's lowest finite value) and ``Xk = where(keep, X, 0)``, per record ``r``
(its rows ``R(r)``, ``n`` elements, ``n_k`` of them kept):

- counts: ``nan``, ``posinf``, ``neginf``, ``masked`` (``X <= lowest``), ``beyond_fp16``
  (kept, ``|x| > 65504``), ``near_fp16_max`` (kept, ``|x| >= 0.98 x 65504``),
  ``flush_fp16`` (``0 < |x| <= 2^-25``), each the sum of its row counts over ``R(r)``;
- ``S = Σ Xk``, per row ``n_row c + Σ d`` with ``c`` the row's rough mean and ``d = x - c``
  (exact for close values, summed in float32), added in float64; ``Q = Σ Xk²`` (float64);
  ``mean = S / n_k``, ``var = Q / n_k - mean²``, and where that could cancel (as
  :func:`~precision.runtime.capture.tensorstats.tensor_stats` decides, on the host) the
  two-pass ``Σ (x - mean)² / n_k`` over kept elements, computed for every record from each
  row's deviations from its own mean (Chan's combination, in float64);
  ``norm = sqrt(Q)``;
- ``min``/``max``: of kept elements within the record (the row padding excluded);
- the sketch: ``Σ_{rows j of r} σ(j' mod 4096, c) σ(j' div 4096) Xk[j, c]`` with
  ``j' = j - first row of r`` (the element's position in the record is ``j' C + c``, so its
  bucket is ``c`` and its sign :func:`precision.dumps.sketch.signs`' own), in float64;
  stored only where nothing was NaN, inf or masked, as the direct path does.

These are the direct path's formulas; sums differ from it only by rounding (the direct
path sums in float32 cascades), the extrema and counts not at all
(``tests/test_deferred.py`` checks both paths on the same records). On the CPU the same
code runs synchronously, which is how it is tested without a device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...dtypes import FP16_FLUSH, FP16_MAX, NEAR_FP16_MAX
from ...dumps.sketch import BUCKETS, MULTIPLIER, PERIOD
from ..devices import streams
from .tensorstats import CANCELLATION, _moments, _sign_table

#: elements of one arena (per device and record dtype): 32 MB of bf16, 64 MB of float32
CAPACITY = 1 << 24
#: rows of the sign table: one period of the sketch's signs, as (ROWS, BUCKETS)
ROWS = PERIOD // BUCKETS
#: columns of the per-record result: counts, sums, extrema, then the sketch
_NAN, _POSINF, _NEGINF, _MASKED, _BEYOND, _NEAR, _FLUSH, _SUM, _SQ, _MIN, _MAX, _DEV = range(12)
_HEAD = 12


@dataclass
class _Batch:
    """Records reduced together: their tickets and sizes, the host copy of the result and the
    event after which it may be read (None on the CPU)."""

    tickets: list[int]
    numels: list[int]
    eps: float
    host: torch.Tensor
    event: Any


@dataclass
class _Lane:
    """The arena of one device and record dtype, and the records written to it so far."""

    device: torch.device
    source: torch.dtype
    buf: torch.Tensor
    used: int = 0  # rows
    tickets: list[int] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    first: list[int] = field(default_factory=list)


class DeferredStats:
    """Queue records' statistics on their device; :meth:`results` brings them to the host.

    ``add`` returns a ticket; ``results()`` maps each ticket to the statistics
    :func:`~precision.runtime.capture.tensorstats.tensor_stats` gives (``detail`` adds
    ``flush_fp16``). ``capacity``: elements per arena. No call here waits for the device
    before :meth:`results` (an arena filled up reduces it and starts its copy to the host,
    and finished copies are read as they complete, without waiting).
    """

    def __init__(self, *, detail: bool = False, capacity: int = CAPACITY) -> None:
        self.detail = detail
        self.capacity = max(capacity, BUCKETS)
        self._lanes: dict[tuple[str, torch.dtype], _Lane] = {}
        self._pending: list[_Batch] = []
        self._done: dict[int, dict[str, Any]] = {}
        self._next = 0

    def add(self, t: torch.Tensor) -> int:
        """Queue the statistics of ``t``; returns the ticket :meth:`results` keys them by."""
        ticket = self._next
        self._next += 1
        x = t.detach()
        n = x.numel()
        if n == 0:
            self._done[ticket] = _empty(0, self.detail)
            return ticket
        store = x.dtype if x.is_floating_point() else torch.float64
        rows = -(-n // BUCKETS)
        if rows * BUCKETS > self.capacity:  # alone, in an arena of its own size
            alone = _Lane(x.device, x.dtype, torch.zeros(rows * BUCKETS, dtype=store,
                                                         device=x.device))
            self._write(alone, x, ticket)
            self._flush(alone, reset=False)
            return ticket
        key = (str(x.device), x.dtype)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(x.device, x.dtype, torch.zeros(
                self.capacity // BUCKETS * BUCKETS, dtype=store, device=x.device))
        if (lane.used + rows) * BUCKETS > lane.buf.numel():
            self._flush(lane)
        self._write(lane, x, ticket)
        self._collect(wait=False)
        return ticket

    @staticmethod
    def _write(lane: _Lane, x: torch.Tensor, ticket: int) -> None:
        start = lane.used * BUCKETS
        lane.buf[start:start + x.numel()].view(x.shape).copy_(x)  # one launch, any strides
        lane.tickets.append(ticket)
        lane.numels.append(x.numel())
        lane.first.append(lane.used)
        lane.used += -(-x.numel() // BUCKETS)

    def results(self) -> dict[int, dict[str, Any]]:
        """Every queued record's statistics by ticket: reduces what is left in the arenas,
        then waits for the copies to the host (the one wait, after the forward)."""
        for lane in self._lanes.values():
            if lane.used:
                self._flush(lane)
        self._collect(wait=True)
        return self._done

    def _collect(self, *, wait: bool) -> None:
        """Read the batches whose copies have arrived (all of them with ``wait``)."""
        keep = []
        for batch in self._pending:
            if batch.event is not None:
                if wait:
                    batch.event.synchronize()
                elif not batch.event.query():
                    keep.append(batch)
                    continue
            values = batch.host.numpy()
            for i, (ticket, n) in enumerate(zip(batch.tickets, batch.numels, strict=True)):
                self._done[ticket] = _decode(values[i], n, batch.eps, self.detail)
        self._pending = keep

    def _flush(self, lane: _Lane, *, reset: bool = True) -> None:
        """Reduce the lane's records into one result tensor and start its copy to the host."""
        device, k, used = lane.device, len(lane.tickets), lane.used
        meta = np.zeros((3, used), dtype=np.int64)  # row -> record, row in record, length
        for r, (first, n) in enumerate(zip(lane.first, lane.numels, strict=True)):
            rows = -(-n // BUCKETS)
            meta[0, first:first + rows] = r
            meta[1, first:first + rows] = np.arange(rows)
            meta[2, first:first + rows] = BUCKETS
            meta[2, first + rows - 1] = n - (rows - 1) * BUCKETS
        api = streams(device.type)
        host_meta = torch.from_numpy(meta)
        if api is not None:
            host_meta = host_meta.pin_memory()
        rec, pos, length = host_meta.to(device, non_blocking=True)
        out = _reduce(lane.buf[:used * BUCKETS].view(used, BUCKETS), rec, pos, length, k,
                      lane.source, self.detail)
        eps = float(torch.finfo(torch.float64 if lane.buf.dtype == torch.float64
                                else torch.float32).eps)  # the direct path's sums'
        if api is None:
            self._pending.append(_Batch(lane.tickets, lane.numels, eps, out, None))
        else:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            event = api.Event()
            event.record(api.current_stream(device))
            self._pending.append(_Batch(lane.tickets, lane.numels, eps, host, event))
        if reset:
            lane.buf[:used * BUCKETS].zero_()  # the next records' row padding reads as 0
            lane.used, lane.tickets, lane.numels, lane.first = 0, [], [], []


def _wide(device: torch.device) -> torch.dtype:
    """float64 where the device computes it at speed (CPU, CUDA), else float32 (NPU)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def _reduce(x: torch.Tensor, rec: torch.Tensor, pos: torch.Tensor, length: torch.Tensor,
            k: int, source: torch.dtype, detail: bool) -> torch.Tensor:
    """The ``(k, 12 + 1021)`` result of the records laid out in ``x`` (see the module's
    docstring): a fixed number of launches whatever ``k``, no synchronisation."""
    device, wide = x.device, _wide(x.device)
    lowest = torch.finfo(source if source.is_floating_point else torch.float64).min
    inside = torch.arange(BUCKETS, device=device) < length[:, None]
    masked = x <= lowest
    keep = torch.isfinite(x) & ~masked
    mag = x.abs()
    kept = torch.where(keep, x, 0)
    counts = [torch.isnan(x), x == math.inf, x == -math.inf, masked,
              keep & (mag > FP16_MAX), keep & (mag >= NEAR_FP16_MAX)]
    counts.append((mag <= FP16_FLUSH) & (mag > 0) if detail else torch.zeros_like(masked))
    acc = torch.promote_types(x.dtype, torch.float32)  # float32 at least
    both = keep & inside
    flags = torch.stack([torch.count_nonzero(c, dim=1).to(wide) for c in counts], 1)
    # each row's kept values as c + d: c its rough mean, d = x - c exact (close values) and
    # small, so Σ d and Σ d² in float32 are accurate; then in float64, per row and record,
    # S = n c + Σ d and (Chan et al.) Σ (x - M)² = Σ d² + 2 (c - M) Σ d + n (c - M)²
    n_row = length.to(wide) - flags[:, _NAN] - flags[:, _POSINF] - flags[:, _MASKED]
    c = kept.sum(1, dtype=acc) / n_row.clamp(min=1).to(acc)
    d = torch.where(both, x - c[:, None], 0)
    sum_d = d.sum(1, dtype=acc).to(wide)
    sq_d = torch.linalg.vector_norm(d, 2, dim=1, dtype=acc).to(wide).square()
    c = c.to(wide)
    total = n_row * c + sum_d
    square = torch.linalg.vector_norm(kept, 2, dim=1, dtype=wide).square()  # no overflow
    head = torch.zeros(k, _HEAD, dtype=wide, device=device)
    head[:, :_MIN].index_add_(0, rec, torch.cat([flags, total[:, None], square[:, None]], 1))
    head[:, _MIN] = math.inf
    head[:, _MAX] = -math.inf
    head[:, _MIN].scatter_reduce_(0, rec, torch.where(both, x, math.inf).amin(1).to(wide),
                                  "amin")
    head[:, _MAX].scatter_reduce_(0, rec, torch.where(both, x, -math.inf).amax(1).to(wide),
                                  "amax")
    n_rec = torch.zeros(k, dtype=wide, device=device).index_add_(0, rec, n_row)
    shift = c - (head[:, _SUM] / n_rec.clamp(min=1))[rec]
    head[:, _DEV].index_add_(0, rec, sq_d + 2 * shift * sum_d + n_row * shift * shift)
    table = _sign_table(PERIOD, device).view(ROWS, BUCKETS)
    signs = table[pos % ROWS] * _hash_sign(pos // ROWS)[:, None]
    sketch = torch.zeros(k, BUCKETS, dtype=wide, device=device)
    sketch.index_add_(0, rec, (kept * signs).to(wide))
    return torch.cat([head, sketch], 1)


def _hash_sign(k: torch.Tensor) -> torch.Tensor:
    """:func:`precision.dumps.sketch.hash_sign` on the device (float32 +-1)."""
    g = ((k & ((1 << 31) - 1)) * MULTIPLIER) & 0xFFFFFFFF
    return (1 - 2 * ((g >> 26) & 1)).to(torch.float32)


def _empty(n: int, detail: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"numel": n, "nan": 0, "posinf": 0, "neginf": 0, "masked": 0,
                           "beyond_fp16": 0, "near_fp16_max": 0}
    out |= dict.fromkeys(("min", "max", "mean", "std", "norm", "absmax"))
    return out | ({"flush_fp16": 0} if detail else {})


def _decode(row: np.ndarray, n: int, eps: float, detail: bool) -> dict[str, Any]:
    """One record's result row as :func:`~precision.runtime.capture.tensorstats.tensor_stats`
    gives it (same keys, order and rules)."""
    nan, posinf, neginf, masked, beyond, near, flush = (int(v) for v in row[:_SUM])
    out = _empty(n, False) | {"nan": nan, "posinf": posinf, "neginf": neginf,
                              "masked": masked, "beyond_fp16": beyond, "near_fp16_max": near}
    n_kept = n - nan - posinf - neginf - masked + neginf
    if n_kept:
        mean = float(row[_SUM]) / n_kept
        var = float(row[_SQ]) / n_kept - mean * mean
        if var <= mean * mean * eps * CANCELLATION:
            var = float(row[_DEV]) / n_kept
        moments = _moments(float(row[_MIN]), float(row[_MAX]), mean, var,
                           math.sqrt(float(row[_SQ])))
        out |= {k: (v if math.isfinite(v) else None) for k, v in moments.items()}
    if not (nan or posinf or neginf or masked):
        out["sketch"] = row[_HEAD:].astype(np.float32)
    return out | ({"flush_fp16": flush} if detail else {})
