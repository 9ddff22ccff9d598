"""Energy flow polynomials (EFPs) of the calorimeter cells around a muon.

For the cells i around a muon, with transverse energy ET_i and position (Δη_i, Δφ_i)
relative to the muon, and a multigraph G on the vertices 0..n-1::

    z_i    = (ET_i / pT_muon) ** kappa
    θ_ij   = ΔR_ij ** beta,    ΔR_ij = sqrt((Δη_i - Δη_j)² + (Δφ_i - Δφ_j)²)
    EFP_G  = Σ_{i_0 .. i_{n-1}}  z_{i_0} ⋯ z_{i_{n-1}}  Π_{(k, l) ∈ G} θ_{i_k i_l}

(arXiv:1712.07124; normalised by the muon pT as in arXiv:2102.02278, so that the EFPs carry
isolation information). A pair that appears m times in G contributes θ^m. The sums run over
all cells independently, so the polynomials are invariant under permutations of the cells
and, as ΔR is, under rotations of the cells about any point. Optionally the muon itself is
one more particle at the centre with z = 1 (``include_axis``); the EFPs then also see how
far the cells lie from the muon, and stay invariant under rotations about it.

The sum is evaluated by variable elimination (the contraction energyflow uses): vertices
are summed out one at a time, each time multiplying only the factors that contain the
vertex, so a graph costs N·M^c for N muons and M cells, where c (at most 4 for degree ≤ 7)
is one more than the largest intermediate's number of free vertices, not N·M^n.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

Edge = tuple[int, int]
FloatArray = npt.NDArray[np.float64]
MAX_DEGREE = 10
CHUNK_ROWS = 1024
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Multigraph:
    """Edges between vertices 0..n-1 (a repeated pair is a multi-edge); no edges: one vertex."""

    edges: tuple[Edge, ...]

    def __post_init__(self) -> None:
        normalised = tuple(sorted((min(a, b), max(a, b)) for a, b in self.edges))
        object.__setattr__(self, "edges", normalised)
        if any(a < 0 for a, _ in normalised):
            raise ValueError(f"EFP graph {list(self.edges)}: vertices must be >= 0")
        if any(a == b for a, b in normalised):
            raise ValueError(f"EFP graph {list(self.edges)}: an edge joins two different vertices")
        if len(normalised) > MAX_DEGREE:
            raise ValueError(
                f"EFP graph {list(self.edges)} has {len(normalised)} edges; at most {MAX_DEGREE}"
            )
        used = {v for edge in normalised for v in edge}
        if used and used != set(range(max(used) + 1)):
            raise ValueError(
                f"EFP graph {list(self.edges)}: vertices must be numbered 0..n-1 without gaps"
            )

    @classmethod
    def of(cls, edges: Iterable[Sequence[int]]) -> Multigraph:
        return cls(tuple((int(a), int(b)) for a, b in edges))

    @property
    def n_vertices(self) -> int:
        return 1 + max((b for _, b in self.edges), default=0)

    @property
    def degree(self) -> int:
        return len(self.edges)

    @property
    def multiplicities(self) -> dict[Edge, int]:
        return dict(Counter(self.edges))

    @property
    def label(self) -> str:
        """'0-1,1-2' (or '•' for the graph without edges)."""
        return ",".join(f"{a}-{b}" for a, b in self.edges) or "•"

    def is_connected(self) -> bool:
        reached, frontier = {0}, [0]
        while frontier:
            vertex = frontier.pop()
            for a, b in self.edges:
                for here, there in ((a, b), (b, a)):
                    if here == vertex and there not in reached:
                        reached.add(there)
                        frontier.append(there)
        return len(reached) == self.n_vertices

    @cached_property
    def elimination_order(self) -> tuple[int, ...]:
        """Greedy minimum-degree order: each step sums out the vertex whose intermediate
        factor has the fewest free vertices (ties: the lower vertex)."""
        neighbours = {v: set[int]() for v in range(self.n_vertices)}
        for a, b in self.edges:
            neighbours[a].add(b)
            neighbours[b].add(a)
        order = []
        while neighbours:
            vertex = min(neighbours, key=lambda v: (len(neighbours[v]), v))
            around = neighbours.pop(vertex)
            for v in around:
                neighbours[v] |= around - {v}
                neighbours[v].discard(vertex)
            order.append(vertex)
        return tuple(order)

    @property
    def complexity(self) -> int:
        """c in the cost N·M^c of :func:`efp_values` for this graph."""
        neighbours = {v: set[int]() for v in range(self.n_vertices)}
        for a, b in self.edges:
            neighbours[a].add(b)
            neighbours[b].add(a)
        largest = 0
        for vertex in self.elimination_order:
            around = neighbours.pop(vertex)
            largest = max(largest, len(around))
            for v in around:
                neighbours[v] |= around - {v}
                neighbours[v].discard(vertex)
        return largest + 1


@dataclass(frozen=True)
class Polynomial:
    """One EFP: a multigraph with its energy exponent κ and angular exponent β."""

    graph: Multigraph
    kappa: float
    beta: float

    @property
    def name(self) -> str:
        return f"efp({self.graph.label};k={self.kappa:g};b={self.beta:g})"


@dataclass(frozen=True)
class Cells:
    """Cells around each muon, padded to M: ET and position relative to the muon [N, M],
    ``mask`` true for real cells, and the muon pT [N] that normalises ET."""

    et: FloatArray
    d_eta: FloatArray
    d_phi: FloatArray
    mask: npt.NDArray[np.bool_]
    pt: FloatArray

    def __len__(self) -> int:
        return len(self.pt)

    def rows(self, start: int, stop: int) -> Cells:
        part = slice(start, stop)
        return Cells(
            self.et[part], self.d_eta[part], self.d_phi[part], self.mask[part], self.pt[part]
        )

    def with_axis(self) -> Cells:
        """The same cells with the muon prepended as a particle at the centre with z = 1."""
        n = len(self.pt)
        return Cells(
            np.concatenate([self.pt[:, None], self.et], axis=1),
            np.concatenate([np.zeros((n, 1)), self.d_eta], axis=1),
            np.concatenate([np.zeros((n, 1)), self.d_phi], axis=1),
            np.concatenate([np.ones((n, 1), dtype=np.bool_), self.mask], axis=1),
            self.pt,
        )


def efp_values(
    cells: Cells,
    polynomials: Sequence[Polynomial],
    *,
    include_axis: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    threads: int = 1,
) -> FloatArray:
    """EFPs [N, len(polynomials)] in float64. Cells with ET <= 0 (noise) do not enter.

    The work is many small contractions, for which torch's thread pool costs more than it
    gives on a shared machine (up to 40 times slower with two threads under load), so one
    thread by default; the caller's setting is restored.
    """
    if include_axis:
        cells = cells.with_axis()
    values = np.empty((len(cells), len(polynomials)), dtype=np.float64)
    groups: dict[tuple[float, float], list[int]] = {}
    for index, polynomial in enumerate(polynomials):
        groups.setdefault((polynomial.kappa, polynomial.beta), []).append(index)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _fill(values, cells, polynomials, groups, chunk_rows)
    finally:
        torch.set_num_threads(previous_threads)
    return values


def _fill(
    values: FloatArray,
    cells: Cells,
    polynomials: Sequence[Polynomial],
    groups: dict[tuple[float, float], list[int]],
    chunk_rows: int,
) -> None:
    with torch.inference_mode():
        for start in range(0, len(cells), chunk_rows):
            chunk = cells.rows(start, start + chunk_rows)
            distance = torch.from_numpy(_pairwise_distance(chunk))
            for (kappa, beta), indices in groups.items():
                z = torch.from_numpy(_energy_weights(chunk, kappa))
                theta = _AnglePowers(distance, beta)
                for index in indices:
                    result = contract(polynomials[index].graph, z, theta)
                    values[start : start + len(chunk), index] = result.numpy()


Factor = tuple[Tensor, tuple[int, ...]]


def contract(graph: Multigraph, z: Tensor, theta: Callable[[int], Tensor]) -> Tensor:
    """EFP_G [N] from the weights ``z`` [N, M] and ``theta(m)`` = θ^m [N, M, M]."""
    factors: list[Factor] = [(z, (v,)) for v in range(graph.n_vertices)]
    factors += [(theta(m), edge) for edge, m in graph.multiplicities.items()]
    for vertex in graph.elimination_order:
        involved = _absorbed([f for f in factors if vertex in f[1]])
        factors = [f for f in factors if vertex not in f[1]]
        free = tuple(sorted({v for _, vs in involved for v in vs} - {vertex}))
        equation = ",".join(_subscript(vs) for _, vs in involved) + "->" + _subscript(free)
        factors.append((torch.einsum(equation, *(t for t, _ in involved)), free))
    result = factors[0][0]
    for tensor, _ in factors[1:]:
        result = result * tensor
    return result


def _absorbed(factors: list[Factor]) -> list[Factor]:
    """The same product with every factor multiplied (elementwise) into one whose vertices
    include its own, so that the contraction that follows multiplies only the few factors
    left, and never builds a tensor with one cell index more than it needs."""
    pending = sorted(factors, key=lambda f: len(f[1]))
    kept: list[Factor] = []
    while pending:
        tensor, vertices = pending.pop(0)
        host = next((i for i, (_, vs) in enumerate(pending) if set(vertices) <= set(vs)), None)
        if host is None:
            kept.append((tensor, vertices))
            continue
        host_tensor, host_vertices = pending[host]
        equation = (
            f"{_subscript(vertices)},{_subscript(host_vertices)}->{_subscript(host_vertices)}"
        )
        pending[host] = (torch.einsum(equation, tensor, host_tensor), host_vertices)
    return kept


def _subscript(vertices: tuple[int, ...]) -> str:
    """The einsum subscript of a factor: 'z' for the rows, then a letter per vertex."""
    return "z" + "".join(_LETTERS[v] for v in vertices)


class _AnglePowers:
    """θ^m = ΔR^(β·m) [N, M, M], each power computed once."""

    def __init__(self, distance: Tensor, beta: float) -> None:
        self.distance = distance
        self.beta = beta
        self.powers: dict[int, Tensor] = {}

    def __call__(self, multiplicity: int) -> Tensor:
        if multiplicity not in self.powers:
            self.powers[multiplicity] = self.distance ** (self.beta * multiplicity)
        return self.powers[multiplicity]


def _energy_weights(cells: Cells, kappa: float) -> FloatArray:
    real = cells.mask & (cells.et > 0)
    fraction = np.where(real, cells.et, 1.0) / cells.pt[:, None]
    return np.where(real, fraction**kappa, 0.0)


def _pairwise_distance(cells: Cells) -> FloatArray:
    d_eta = cells.d_eta[:, :, None] - cells.d_eta[:, None, :]
    d_phi = (cells.d_phi[:, :, None] - cells.d_phi[:, None, :] + np.pi) % (2 * np.pi) - np.pi
    distance: FloatArray = np.hypot(d_eta, d_phi)
    return distance
