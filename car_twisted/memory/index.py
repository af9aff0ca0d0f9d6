"""
The fact-term incidence matrix of one memory graph, and the personalized
PageRank walk that ranks facts from a query's terms.

Layout: a bipartite graph, one row ("slot") per fact and one column per
term, stored as a binary CSR matrix ``B`` (facts x terms).  New facts are
new rows at the bottom, so the CSR arrays are append-only: an add writes
the fact's column indices at the end of ``indices`` and one entry of
``indptr`` in buffers that grow by doubling (amortised O(terms of the
fact); each growth is one copy, counted in ``builds``).  A query wraps
views of those buffers in a ``csr_array`` (no copy), so the first query
after a burst of adds costs what any query costs.

Removal is a tombstone: the row's ``alive`` entry drops to 0 and its
terms' live degrees go down by one (O(terms)).  When dead rows outnumber
live ones (and there are more than ``COMPACT_MIN``), the buffers are
rebuilt with only live rows and the terms they still use (one O(size)
copy, counted in ``builds``), so tombstones never cost more than the live
graph and each removal pays for its share of one compaction.

The walk: seed mass on the query's terms that have live facts, weighted by
``log(1 + live facts / term's live degree)`` (rare terms count more) and
summing to 1; a step from a term spreads its mass equally over the term's
live facts, a step from a fact equally over its terms; a fact's score is
the truncated personalized-PageRank series

    score = sum over odd hops h of ALPHA**h * (mass on the fact after h hops)

with continuation probability ``ALPHA`` (0.5), i.e. PageRank with restart
0.5 from the seed terms, the constant factor dropped.  At most
``MAX_LEVELS`` fact levels (``2 * MAX_LEVELS - 1`` sparse
matrix-vector products); the walk stops early once what is left of the
series cannot move any score by more than ``TOLERANCE`` of the best one.
Two hops reach a fact through one shared term, four through two: a fact
that shares nothing with the query but an entity with a fact that does is
found, one sharing no path with it never is (its score stays exactly 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import scipy.sparse  # type: ignore[import-untyped, unused-ignore]  # scipy ships no type information

__all__ = ["ALPHA", "COMPACT_MIN", "MAX_LEVELS", "TermIndex"]

ALPHA = 0.5
MAX_LEVELS = 8
TOLERANCE = 1e-4
COMPACT_MIN = 1024
# Relative scores are rounded to this many decimals before ranking, so two
# facts the walk cannot tell apart tie exactly (and keep insertion order)
# whatever order floating-point sums ran in.
SCORE_DECIMALS = 9
# The largest standard deviation of a Beta(a, b) with a, b >= 1 (at a = b = 1):
# it scales the upper confidence bound into [0, 1].
_MAX_BETA_STD = math.sqrt(1.0 / 12.0)

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]


def _grown(array: npt.NDArray[np.generic], needed: int) -> npt.NDArray[np.generic]:
    capacity = max(needed, 2 * len(array), 16)
    out = np.zeros(capacity, dtype=array.dtype)
    out[: len(array)] = array
    return out


class TermIndex:
    """
    The incidence matrix, the per-fact arrays the ranking needs (alive,
    degree, insertion sequence, outcome counts) and the walk.  Facts are
    known by key (their id); a key has at most one live row.
    """

    def __init__(self) -> None:
        self._terms: dict[str, int] = {}
        self._n_cols = 0
        self._coldeg: F64 = np.zeros(64, dtype=np.float64)
        self._rows = 0
        self._nnz = 0
        self._indptr: I32 = np.zeros(65, dtype=np.int32)
        self._indices: I32 = np.zeros(256, dtype=np.int32)
        self._ones: F64 = np.ones(256, dtype=np.float64)
        self._alive: F64 = np.zeros(64, dtype=np.float64)
        self._inv_rowdeg: F64 = np.zeros(64, dtype=np.float64)
        self._seq: I64 = np.zeros(64, dtype=np.int64)
        self._succ: F64 = np.zeros(64, dtype=np.float64)
        self._fail: F64 = np.zeros(64, dtype=np.float64)
        self._keys: list[str | None] = []
        self._slot: dict[str, int] = {}
        #: How many O(size) copies the buffers have cost: growths and compactions.
        self.builds = 0

    # -- sizes ---------------------------------------------------------------

    @property
    def live(self) -> int:
        """Live facts (rows that take part in the walk)."""
        return len(self._slot)

    @property
    def rows(self) -> int:
        """Rows held, live and tombstoned."""
        return self._rows

    @property
    def nnz(self) -> int:
        """Fact-term incidences held."""
        return self._nnz

    @property
    def n_terms(self) -> int:
        return self._n_cols

    def __contains__(self, key: str) -> bool:
        return key in self._slot

    # -- changes -------------------------------------------------------------

    def add(self, key: str, terms: Iterable[str], seq: int, successes: int = 0, failures: int = 0) -> None:
        """
        Add a live row for C{key} linked to C{terms} (no repeats).  C{seq}
        orders equal scores (lower first).
        """
        if key in self._slot:
            raise KeyError(f"{key!r} already has a live row")
        columns = self._terms
        cols: list[int] = []
        for term in terms:
            col = columns.get(term)
            if col is None:
                col = self._new_column(term)
            cols.append(col)
        # Sorted, so two rows with the same terms sum in the same order and
        # score bit-for-bit the same.
        cols.sort()
        width = len(cols)
        row = self._rows
        if row + 2 > len(self._indptr):
            self._grow_rows(row + 2)
        end = self._nnz + width
        if end > len(self._indices):
            self._indices = _grown(self._indices, end)  # type: ignore[assignment]
            self._ones = np.ones(len(self._indices), dtype=np.float64)
            self.builds += 1
        if width:
            self._indices[self._nnz : end] = cols
            self._coldeg[cols] += 1.0
            self._inv_rowdeg[row] = 1.0 / width
        self._indptr[row + 1] = end
        self._alive[row] = 1.0
        self._seq[row] = seq
        self._succ[row] = successes
        self._fail[row] = failures
        self._nnz = end
        self._rows = row + 1
        self._keys.append(key)
        self._slot[key] = row

    def remove(self, key: str) -> bool:
        """Take C{key}'s row out of the walk; @return: whether it had one."""
        row = self._slot.pop(key, None)
        if row is None:
            return False
        self._keys[row] = None
        self._alive[row] = 0.0
        cols = self._indices[self._indptr[row] : self._indptr[row + 1]]
        self._coldeg[cols] -= 1.0
        dead = self._rows - len(self._slot)
        if dead > COMPACT_MIN and dead > len(self._slot):
            self._compact()
        return True

    def set_outcome(self, key: str, successes: int, failures: int) -> None:
        """C{key}'s outcome counts, for the utility blend."""
        row = self._slot.get(key)
        if row is not None:
            self._succ[row] = successes
            self._fail[row] = failures

    def _new_column(self, term: str) -> int:
        col = self._n_cols
        if col >= len(self._coldeg):
            self._coldeg = _grown(self._coldeg, col + 1)  # type: ignore[assignment]
        self._terms[term] = col
        self._n_cols = col + 1
        return col

    def _grow_rows(self, needed: int) -> None:
        self._indptr = _grown(self._indptr, needed)  # type: ignore[assignment]
        rows = len(self._indptr) - 1
        self._alive = _grown(self._alive, rows)  # type: ignore[assignment]
        self._inv_rowdeg = _grown(self._inv_rowdeg, rows)  # type: ignore[assignment]
        self._seq = _grown(self._seq, rows)  # type: ignore[assignment]
        self._succ = _grown(self._succ, rows)  # type: ignore[assignment]
        self._fail = _grown(self._fail, rows)  # type: ignore[assignment]
        self.builds += 1

    def _compact(self) -> None:
        """Rebuild the buffers with only the live rows and the terms they use."""
        rows, nnz = self._rows, self._nnz
        keep_row = self._alive[:rows] > 0
        widths = np.diff(self._indptr[: rows + 1])
        indices = self._indices[:nnz][np.repeat(keep_row, widths)]
        keep_col = self._coldeg[: self._n_cols] > 0
        renumber = np.cumsum(keep_col, dtype=np.int64) - 1
        indices = renumber[indices].astype(np.int32)
        self._terms = {term: int(renumber[col]) for term, col in self._terms.items() if keep_col[col]}
        self._n_cols = len(self._terms)
        self._coldeg = _grown(self._coldeg[: len(keep_col)][keep_col], self._n_cols + 16)  # type: ignore[assignment]
        live_widths = widths[keep_row]
        n_live = int(keep_row.sum())
        headroom = n_live + n_live // 4 + 16
        indptr = np.zeros(headroom + 1, dtype=np.int32)
        np.cumsum(live_widths, out=indptr[1 : n_live + 1])
        self._indptr = indptr
        self._nnz = len(indices)
        self._indices = _grown(indices, self._nnz + self._nnz // 4 + 16)  # type: ignore[assignment]
        self._ones = np.ones(len(self._indices), dtype=np.float64)
        for name in ("_alive", "_inv_rowdeg", "_seq", "_succ", "_fail"):
            kept = getattr(self, name)[:rows][keep_row]
            setattr(self, name, _grown(kept, headroom))
        self._keys = [key for key in self._keys if key is not None]
        self._slot = {key: row for row, key in enumerate(self._keys) if key is not None}
        self._rows = n_live
        self.builds += 1

    # -- the walk ------------------------------------------------------------

    def matrix(self) -> scipy.sparse.csr_array:
        """The live part of the incidence matrix, as views of the buffers."""
        rows, nnz = self._rows, self._nnz
        return scipy.sparse.csr_array(
            (self._ones[:nnz], self._indices[:nnz], self._indptr[: rows + 1]),
            shape=(rows, self._n_cols),
            copy=False,
        )

    def relevance(self, terms: Iterable[str]) -> F64 | None:
        """
        Every row's personalized-PageRank score from C{terms} (0 for rows
        not reached and for dead rows), or None when no term has a live fact.
        """
        cols: list[int] = []
        for term in terms:
            col = self._terms.get(term)
            if col is not None and self._coldeg[col] > 0 and col not in cols:
                cols.append(col)
        if not cols:
            return None
        rows, n_cols = self._rows, self._n_cols
        degree = self._coldeg[:n_cols]
        seed_cols = np.asarray(cols, dtype=np.int64)
        weights = np.log1p(len(self._slot) / degree[seed_cols])
        walk_terms = np.zeros(n_cols, dtype=np.float64)
        walk_terms[seed_cols] = weights / weights.sum()
        inv_coldeg = np.zeros(n_cols, dtype=np.float64)
        np.divide(1.0, degree, out=inv_coldeg, where=degree > 0)
        alive = self._alive[:rows]
        inv_rowdeg = self._inv_rowdeg[:rows]
        matrix = self.matrix()
        transposed = matrix.T
        score = np.zeros(rows, dtype=np.float64)
        coef = ALPHA
        for level in range(MAX_LEVELS):
            walk_facts: F64 = matrix @ (walk_terms * inv_coldeg)
            walk_facts *= alive
            score += coef * walk_facts
            coef *= ALPHA * ALPHA
            if level + 1 == MAX_LEVELS:
                break
            # What the rest of the series can still add to any one score.
            remaining = coef * float(walk_facts.sum()) / (1.0 - ALPHA * ALPHA)
            if remaining <= TOLERANCE * float(score.max()):
                break
            walk_terms = transposed @ (walk_facts * inv_rowdeg)
        return score

    def rank(self, terms: Iterable[str], k: int, weight: float = 0.0, exploration: float = 0.0) -> list[tuple[str, float]]:
        """
        The C{k} best (key, score) pairs for C{terms}, best first, equal
        scores in C{seq} order.  Only facts the walk reaches are ranked.

        A score is the relevance relative to the best one, in (0, 1].  With
        C{weight} > 0 it is C{(1 - weight) * relevance + weight * ucb}, where
        C{ucb} is the fact's Beta(1 + successes, 1 + failures) mean plus
        C{exploration} standard deviations, scaled into [0, 1] by its largest
        possible value; with C{weight} 0 the utility is not computed at all.
        """
        if k <= 0:
            return []
        score = self.relevance(terms)
        if score is None:
            return []
        candidates = np.flatnonzero(score > 0)
        if len(candidates) == 0:
            return []
        final = np.round(score[candidates] / score[candidates].max(), SCORE_DECIMALS)
        if weight > 0:
            a = 1.0 + self._succ[candidates]
            b = 1.0 + self._fail[candidates]
            mean = a / (a + b)
            std = np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1.0)))
            ucb = (mean + exploration * std) / (1.0 + exploration * _MAX_BETA_STD)
            final = np.round((1.0 - weight) * final + weight * ucb, SCORE_DECIMALS)
        if len(candidates) > k:
            # Everything at or above the k-th best score, ties included, so
            # the tie-break below sees all of them.
            kth = -np.partition(-final, k - 1)[k - 1]
            keep = final >= kth
            candidates, final = candidates[keep], final[keep]
        order = np.lexsort((self._seq[candidates], -final))[:k]
        keys = self._keys
        out: list[tuple[str, float]] = []
        for i in order.tolist():
            key = keys[int(candidates[i])]
            if key is not None:
                out.append((key, float(final[i])))
        return out
