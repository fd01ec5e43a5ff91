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
it, gives every record's statistics into device tensors (the counts as integers, the rest
in the wide dtype), which are copied to pinned host memory behind an event; the host reads
them after the forward. Memory on the device is the arena (``capacity`` elements, 16M by
default: 32 MB in bf16; it starts at 1M elements and doubles as records need) and the
batch's temporaries (a few times the arena). A record larger than the arena goes through
it in pieces of whole rows, each piece's sketch signed by its rows' places in the record;
the host combines the pieces' results (counts, sums and extrema added or compared, the
deviations about each piece's mean by Chan's formula, below), so no temporary grows with
the record (but for a strided one, made contiguous first: one copy of it). Integer
records go through a float64 arena, float32 where the device has no float64 (NPU): exact
below 2^24, as token ids, masks and T5's buckets are.

With ``X`` the arena as ``(rows, C)``, ``keep = isfinite(X) & (X > lowest)`` (``lowest``
the record dtype's lowest finite value) and ``Xk = where(keep, X, 0)``, per record ``r``
(its rows ``R(r)``, ``n`` elements, ``n_k`` of them kept):

- counts: ``nan``, ``posinf``, ``neginf``, ``masked`` (``X <= lowest``), ``beyond_fp16``
  (kept, ``|x| > 65504``), ``near_fp16_max`` (kept, ``|x| >= 0.98 x 65504``),
  ``flush_fp16`` (``0 < |x| <= 2^-25``), each the sum of its row counts over ``R(r)``;
- ``S = Σ Xk``, per row ``n_row c + Σ d`` with ``c`` the row's mean rounded to the record's
  dtype (float32 at least) and ``d = x - c`` (exact for close values), summed in the wide
  dtype (float64; float32 on a device without it, an NPU); ``Q = Σ Xk²`` (likewise);
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
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...dtypes import FP16_FLUSH, FP16_MAX, NEAR_FP16_MAX
from ...dumps.sketch import BUCKETS, MULTIPLIER, PERIOD
from ..devices import streams
from .streaming import host_empty
from .tensorstats import CANCELLATION, _moments, _sign_table

#: elements of one arena (per device and record dtype): 32 MB of bf16, 64 MB of float32
CAPACITY = 1 << 24
#: the rows an arena starts with (1M elements), doubled as records need, up to its capacity
FIRST_ROWS = 1024
#: rows of the sign table: one period of the sketch's signs, as (ROWS, BUCKETS)
ROWS = PERIOD // BUCKETS
#: columns of the per-record counts (integers)
_NAN, _POSINF, _NEGINF, _MASKED, _BEYOND, _NEAR, _FLUSH = range(7)
_COUNTS = 7
#: columns of the per-record values (the wide dtype): sums, extrema, deviations, the sketch
_SUM, _SQ, _MIN, _MAX, _DEV = range(5)
_HEAD = 5


@dataclass
class _Batch:
    """Records reduced together: their tickets and sizes, the host copies of the results
    (counts, values) and the event after which they may be read (None on the CPU)."""

    tickets: list[int]
    numels: list[int]
    eps: float
    counts: torch.Tensor
    values: torch.Tensor
    event: Any


@dataclass
class _Lane:
    """The arena of one device and record dtype, and the records written to it so far
    (``first``: each one's first row in the arena; ``row0``: its first row's place in the
    record it is a piece of, 0 for a whole record)."""

    device: torch.device
    source: torch.dtype
    buf: torch.Tensor
    used: int = 0  # rows
    tickets: list[int] = field(default_factory=list)
    numels: list[int] = field(default_factory=list)
    first: list[int] = field(default_factory=list)
    row0: list[int] = field(default_factory=list)


@dataclass
class _Raw:
    """One record's (or piece's) result as read on the host, before :func:`_decode`: its
    size, its counts, its values and the float epsilon of the direct path's sums."""

    numel: int
    counts: np.ndarray
    values: np.ndarray
    eps: float


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
        self._raw: dict[int, _Raw] = {}
        #: a record taken in pieces: its ticket -> its pieces' tickets
        self._pieces: dict[int, list[int]] = {}
        #: tickets of empty records (statistics of none)
        self._no_elements: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()

    def add(self, t: torch.Tensor) -> int:
        """Queue the statistics of ``t``; returns the ticket :meth:`results` keys them by.
        Safe from several threads (the autograd threads of a model on several devices call
        the gradient hooks)."""
        with self._lock:
            return self._add(t)

    def _add(self, t: torch.Tensor) -> int:
        ticket = self._ticket()
        x = t.detach()
        n = x.numel()
        if n == 0:
            self._no_elements.add(ticket)
            return ticket
        piece = self.capacity // BUCKETS * BUCKETS
        if n <= piece:
            self._write(x, ticket, 0)
        else:  # in pieces of whole rows, through the arena
            flat = x.reshape(-1)
            parts = self._pieces[ticket] = [self._ticket() for _ in range(0, n, piece)]
            for part, start in zip(parts, range(0, n, piece), strict=True):
                self._write(flat[start:start + piece], part, start // BUCKETS)
        self._collect(wait=False)
        return ticket

    def _ticket(self) -> int:
        self._next += 1
        return self._next - 1

    def _write(self, x: torch.Tensor, ticket: int, row0: int) -> None:
        """Write ``x`` (at most an arena's worth) to its lane, flushing or growing it first
        when it has no room left."""
        rows = -(-x.numel() // BUCKETS)
        lane = self._lane(x, rows)
        start = lane.used * BUCKETS
        lane.buf[start:start + x.numel()].view(x.shape).copy_(x)  # one launch, any strides
        lane.tickets.append(ticket)
        lane.numels.append(x.numel())
        lane.first.append(lane.used)
        lane.row0.append(row0)
        lane.used += rows

    def _lane(self, x: torch.Tensor, rows: int) -> _Lane:
        """The lane of ``x``'s device and dtype with room for ``rows`` more rows (at most
        the capacity's): flushed when full, and then made twice as large until it has the
        capacity's rows."""
        key = (str(x.device), x.dtype)
        lane = self._lanes.get(key)
        most = self.capacity // BUCKETS
        have = 0 if lane is None else lane.buf.numel() // BUCKETS
        if lane is not None:
            if lane.used + rows <= have:
                return lane
            if lane.used:
                self._flush(lane)
            if have == most:
                return lane
        size = min(most, max(rows, FIRST_ROWS, 2 * have))
        store = x.dtype if x.is_floating_point() else _wide(x.device)
        buf = torch.zeros(size * BUCKETS, dtype=store, device=x.device)
        lane = self._lanes[key] = _Lane(x.device, x.dtype, buf)
        return lane

    def results(self) -> dict[int, dict[str, Any]]:
        """Every queued record's statistics by ticket: reduces what is left in the arenas,
        then waits for the copies to the host (the one wait, after the forward)."""
        for lane in self._lanes.values():
            if lane.used:
                self._flush(lane)
        self._collect(wait=True)
        done = {t: _empty(0, self.detail) for t in self._no_elements}
        for ticket, parts in self._pieces.items():
            done[ticket] = _decode(_combine([self._raw.pop(p) for p in parts]), self.detail)
        for ticket, raw in self._raw.items():
            done[ticket] = _decode(raw, self.detail)
        return done

    def release(self) -> None:
        """Let go of the arenas (device memory) once the results are read."""
        self._lanes.clear()

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
            counts, values = batch.counts.numpy(), batch.values.numpy()
            for i, (ticket, n) in enumerate(zip(batch.tickets, batch.numels, strict=True)):
                self._raw[ticket] = _Raw(n, counts[i], values[i], batch.eps)
        self._pending = keep

    def _flush(self, lane: _Lane) -> None:
        """Reduce the lane's records into result tensors and start their copy to the host."""
        device, k, used = lane.device, len(lane.tickets), lane.used
        meta = np.zeros((3, used), dtype=np.int64)  # row -> record, row in record, length
        for r, (first, n, row0) in enumerate(zip(lane.first, lane.numels, lane.row0,
                                                 strict=True)):
            rows = -(-n // BUCKETS)
            meta[0, first:first + rows] = r
            meta[1, first:first + rows] = row0 + np.arange(rows)
            meta[2, first:first + rows] = BUCKETS
            meta[2, first + rows - 1] = n - (rows - 1) * BUCKETS
        api = streams(device.type)
        host_meta = host_empty(meta.shape, torch.int64, pin=api is not None)
        host_meta.copy_(torch.from_numpy(meta))
        rec, pos, length = host_meta.to(device, non_blocking=True)
        counts, values = _reduce(lane.buf[:used * BUCKETS].view(used, BUCKETS), rec, pos,
                                 length, k, lane.source, self.detail)
        eps = float(torch.finfo(torch.float64 if lane.buf.dtype == torch.float64
                                else torch.float32).eps)  # the direct path's sums'
        if api is None:
            self._pending.append(_Batch(lane.tickets, lane.numels, eps, counts, values, None))
        else:
            host_counts = host_empty(tuple(counts.shape), counts.dtype, pin=True)
            host_values = host_empty(tuple(values.shape), values.dtype, pin=True)
            host_counts.copy_(counts, non_blocking=True)
            host_values.copy_(values, non_blocking=True)
            event = api.Event()
            event.record(api.current_stream(device))
            self._pending.append(_Batch(lane.tickets, lane.numels, eps, host_counts,
                                        host_values, event))
        lane.buf[:used * BUCKETS].zero_()  # the next records' row padding reads as 0
        lane.used, lane.tickets, lane.numels, lane.first, lane.row0 = 0, [], [], [], []


def _wide(device: torch.device) -> torch.dtype:
    """float64 where the device computes it at speed (CPU, CUDA), else float32 (NPU)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def _reduce(x: torch.Tensor, rec: torch.Tensor, pos: torch.Tensor, length: torch.Tensor,
            k: int, source: torch.dtype, detail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(k, 7)`` integer counts and the ``(k, 5 + 1021)`` values of the records laid
    out in ``x`` (see the module's docstring): a fixed number of launches whatever ``k``,
    no synchronisation."""
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
    flags = torch.stack([torch.count_nonzero(c, dim=1) for c in counts], 1)  # int64
    # each row's kept values as c + d: c its mean, d = x - c exact (close values) and
    # small, so Σ d and Σ d² are accurate; then per row and record, S = n c + Σ d and
    # (Chan et al.) Σ (x - M)² = Σ d² + 2 (c - M) Σ d + n (c - M)²
    n_kept = length - flags[:, _NAN] - flags[:, _POSINF] - flags[:, _MASKED]
    n_row = n_kept.to(wide)
    # the row's sum in wide (no overflow), its mean rounded to acc: d is x - c exactly
    c_acc = (kept.sum(1, dtype=wide) / n_row.clamp(min=1)).to(acc)
    d = torch.where(both, x - c_acc[:, None], 0)
    sum_d = d.sum(1, dtype=wide)
    sq_d = _squares(d, wide)
    c = c_acc.to(wide)
    total = n_row * c + sum_d
    head = torch.zeros(k, _HEAD, dtype=wide, device=device)
    head[:, _SUM].index_add_(0, rec, total)
    head[:, _SQ].index_add_(0, rec, _squares(kept, wide))
    head[:, _MIN] = math.inf
    head[:, _MAX] = -math.inf
    head[:, _MIN].scatter_reduce_(0, rec, torch.where(both, x, math.inf).amin(1).to(wide),
                                  "amin")
    head[:, _MAX].scatter_reduce_(0, rec, torch.where(both, x, -math.inf).amax(1).to(wide),
                                  "amax")
    n_rec = torch.zeros(k, dtype=n_kept.dtype, device=device).index_add_(0, rec, n_kept)
    shift = c - (head[:, _SUM] / n_rec.to(wide).clamp(min=1))[rec]
    head[:, _DEV].index_add_(0, rec, sq_d + 2 * shift * sum_d + n_row * shift * shift)
    table = _sign_table(PERIOD, device).view(ROWS, BUCKETS)
    signs = table[pos % ROWS] * _hash_sign(pos // ROWS)[:, None]
    sketch = torch.zeros(k, BUCKETS, dtype=wide, device=device)
    sketch.index_add_(0, rec, (kept * signs).to(wide))
    per_record = torch.zeros(k, _COUNTS, dtype=flags.dtype, device=device)
    return per_record.index_add_(0, rec, flags), torch.cat([head, sketch], 1)


def _squares(x: torch.Tensor, wide: torch.dtype) -> torch.Tensor:
    """Each row's sum of squares, accumulated in ``wide`` (a wider ``x``, float64 on a
    device without it, is narrowed first: ``vector_norm`` only widens)."""
    if x.dtype.itemsize > wide.itemsize:
        x = x.to(wide)
    return torch.linalg.vector_norm(x, 2, dim=1, dtype=wide).square()


def _combine(parts: list[_Raw]) -> _Raw:
    """A record's result from its pieces' (in float64 on the host): counts, sums and the
    sketch added, the extrema compared, and the deviations about each piece's mean ``m_p``
    moved to the record's mean ``M``: ``Σ_p D_p + n_p (m_p - M)²`` (``n_p`` kept values)."""
    counts = np.sum([p.counts for p in parts], axis=0)
    values = np.sum([p.values.astype(np.float64) for p in parts], axis=0)
    values[_MIN] = min(float(p.values[_MIN]) for p in parts)
    values[_MAX] = max(float(p.values[_MAX]) for p in parts)
    kept = [_kept(p.numel, p.counts) for p in parts]
    mean = values[_SUM] / max(sum(kept), 1)
    values[_DEV] = sum(float(p.values[_DEV]) + n * (float(p.values[_SUM]) / n - mean) ** 2
                       for p, n in zip(parts, kept, strict=True) if n)
    return _Raw(sum(p.numel for p in parts), counts, values, parts[0].eps)


def _kept(n: int, counts: np.ndarray) -> int:
    """Values that are neither NaN, +inf nor masked (-inf is masked) of ``n``."""
    return int(n - counts[_NAN] - counts[_POSINF] - counts[_MASKED])


def _hash_sign(k: torch.Tensor) -> torch.Tensor:
    """:func:`precision.dumps.sketch.hash_sign` on the device (float32 +-1)."""
    g = ((k & ((1 << 31) - 1)) * MULTIPLIER) & 0xFFFFFFFF
    return (1 - 2 * ((g >> 26) & 1)).to(torch.float32)


def _empty(n: int, detail: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"numel": n, "nan": 0, "posinf": 0, "neginf": 0, "masked": 0,
                           "beyond_fp16": 0, "near_fp16_max": 0}
    out |= dict.fromkeys(("min", "max", "mean", "std", "norm", "absmax"))
    return out | ({"flush_fp16": 0} if detail else {})


def _decode(raw: _Raw, detail: bool) -> dict[str, Any]:
    """One record's result as :func:`~precision.runtime.capture.tensorstats.tensor_stats`
    gives it (same keys, order and rules)."""
    nan, posinf, neginf, masked, beyond, near, flush = (int(v) for v in raw.counts)
    row = raw.values
    out = _empty(raw.numel, False) | {"nan": nan, "posinf": posinf, "neginf": neginf,
                                      "masked": masked, "beyond_fp16": beyond,
                                      "near_fp16_max": near}
    n_kept = _kept(raw.numel, raw.counts)
    if n_kept:
        mean = float(row[_SUM]) / n_kept
        var = float(row[_SQ]) / n_kept - mean * mean
        if var <= mean * mean * raw.eps * CANCELLATION:
            var = float(row[_DEV]) / n_kept
        moments = _moments(float(row[_MIN]), float(row[_MAX]), mean, var,
                           math.sqrt(float(row[_SQ])))
        out |= {k: (v if math.isfinite(v) else None) for k, v in moments.items()}
    if not (nan or posinf or neginf or masked):
        out["sketch"] = row[_HEAD:].astype(np.float32)
    return out | ({"flush_fp16": flush} if detail else {})
