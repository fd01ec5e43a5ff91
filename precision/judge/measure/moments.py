"""Running means and centred (co-)moments, merged chunk by chunk (Chan, Golub and LeVeque).

For two sequences ``a`` and ``b`` of ``n`` elements: ``mean_a``, ``mean_b``,
``m2a = Σ (a_i - mean_a)²``, ``m2b = Σ (b_i - mean_b)²`` and
``cab = Σ (a_i - mean_a)(b_i - mean_b)``. Two parts merge exactly, with
``δ_a = mean_a' - mean_a``, ``δ_b = mean_b' - mean_b`` and ``w = n n' / (n + n')``::

    m2a += m2a' + δ_a² w      m2b += m2b' + δ_b² w      cab += cab' + δ_a δ_b w

so a tensor read in chunks, or split across workers, gives the moments of the whole without
the cancellation of ``Σa² - n mean²``. One sequence alone is the pair with ``b = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Moments:
    """Count, means and centred co-moments of one part (see the module docstring)."""

    n: int = 0
    mean_a: float = 0.0
    mean_b: float = 0.0
    m2a: float = 0.0
    m2b: float = 0.0
    cab: float = 0.0

    def merge(self, other: Moments) -> Moments:
        """The moments of both parts together."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        da, db = other.mean_a - self.mean_a, other.mean_b - self.mean_b
        w = self.n * other.n / n
        return Moments(n, self.mean_a + da * other.n / n, self.mean_b + db * other.n / n,
                       self.m2a + other.m2a + da * da * w, self.m2b + other.m2b + db * db * w,
                       self.cab + other.cab + da * db * w)
