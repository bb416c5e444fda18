"""RETAB's boundary-aware random walk, on one image's feature grid.

PSA/RETAB propagate class activation maps with a transition matrix built from semantic affinities between
pixels of a small neighbourhood:

- affinity ``a_ij = exp(-mean_c |f_i - f_j|)`` for pixels within ``radius`` of each other (and ``a_ii = 1``),
  raised to the power ``beta`` (sharpens it);
- **stage 1**: only pairs of two *non-boundary* pixels (and self-loops) are kept, so no mass crosses a
  predicted boundary. RETAB checks only the two ends, so with radius 5 a thin boundary can be jumped over;
  here a pair is also dropped when the straight line between its pixels passes a boundary pixel (IRNet's
  path criterion, Ahn et al. 2019), which makes a one-pixel boundary a wall; the column-normalised
  matrix ``T`` is squared ``log_t`` times (``T^(2^log_t)``) and the maps become ``maps @ T``;
- **stage 2**: the stage-1 maps are propagated once more, with affinities among boundary pixels (both ways)
  and *from* non-boundary *to* boundary pixels only: boundary pixels, which stage 1 left alone, take their
  values from their surroundings while non-boundary pixels keep theirs (they only have their self-loop).

``T`` is column-stochastic (every column sums to 1): a walker's distribution ``p -> T p`` keeps its total
mass, and ``maps @ T`` gives every pixel a convex combination of the values within its reach (a constant map is
left unchanged, no value leaves the input's range). PSA and RETAB use this dense form on the stride-8 grid; the
embedded 32 px images give a 16 x 16 grid at stride 2, 256 x 256 matrices.
"""

from __future__ import annotations

import functools

import torch

from weakshot.losses.retab import half_offsets

Tensor = torch.Tensor

__all__ = ["neighbour_pairs", "path_crosses", "random_walk", "transition_matrix", "affinities"]


def neighbour_pairs(height: int, width: int, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j), i != j, of grid pixels within Euclidean distance ``radius`` (both orders): the
    neighbourhood the affinity loss trains on (``half_offsets``), so the walk uses no pair it never saw."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    sources, targets = [], []
    for half_dy, half_dx in half_offsets(radius):
        for dy, dx in ((half_dy, half_dx), (-half_dy, -half_dx)):
            ty, tx = ys + dy, xs + dx
            inside = (ty >= 0) & (ty < height) & (tx >= 0) & (tx < width)
            sources.append((ys * width + xs)[inside])
            targets.append((ty * width + tx)[inside])
    return torch.cat(sources), torch.cat(targets)


def path_crosses(boundary: Tensor, sources: Tensor, targets: Tensor) -> Tensor:
    """For each pair, whether a pixel on the straight line between its ends (ends excluded) is a boundary
    pixel. ``boundary`` H x W bool."""
    height, width = boundary.shape
    flat = boundary.reshape(-1)
    sy, sx = sources // width, sources % width
    ty, tx = targets // width, targets % width
    steps = int(max((ty - sy).abs().max(), (tx - sx).abs().max(), 1)) if len(sources) else 1
    crosses = torch.zeros(len(sources), dtype=torch.bool)
    for k in range(1, 2 * steps):  # half-pixel steps along the segment catch the pixels it passes
        t = k / (2 * steps)
        y = torch.round(sy + t * (ty - sy)).long()
        x = torch.round(sx + t * (tx - sx)).long()
        index = y * width + x
        inner = (index != sources) & (index != targets)
        crosses |= inner & flat[index]
    return crosses


def affinities(features: Tensor, sources: Tensor, targets: Tensor) -> Tensor:
    """``exp(-mean_c |f_i - f_j|)`` for each pair; ``features`` C x N (flattened grid). Read from the dense
    N x N L1 distances (one ``cdist``): cheaper than gathering C values for each of the ~N x 80 pairs."""
    points = features.T[None]
    distances = torch.cdist(points, points, p=1)[0] / features.shape[0]
    return torch.exp(-distances[sources, targets])


# Every image of a dataset has the same grid: its neighbour pairs are built once.
grid_pairs = functools.lru_cache(maxsize=16)(neighbour_pairs)


def transition_matrix(
    num_pixels: int, sources: Tensor, targets: Tensor, weights: Tensor, self_loops: Tensor | None = None
) -> Tensor:
    """Dense column-normalised N x N matrix with ``T[i, j]`` proportional to ``weights`` of pair (i, j) and
    ``self_loops`` (default 1) on the diagonal. Column j: where the mass arriving at pixel j comes from."""
    matrix = torch.zeros(num_pixels, num_pixels, dtype=weights.dtype)
    matrix[sources, targets] = weights
    diagonal = torch.ones(num_pixels, dtype=weights.dtype) if self_loops is None else self_loops.to(weights.dtype)
    matrix += torch.diag(diagonal)
    return matrix / matrix.sum(0, keepdim=True).clamp(min=1e-12)


def random_walk(
    maps: Tensor, features: Tensor, boundary: Tensor, *, radius: int = 5, beta: float = 8.0, log_t: int = 8
) -> Tensor:
    """Two-stage boundary-aware random walk of ``maps`` (K x H x W) over ``features`` (C x H x W) with
    ``boundary`` (H x W bool, True on predicted boundary pixels). Returns K x H x W."""
    k, height, width = maps.shape
    n = height * width
    flat_maps = maps.reshape(k, n).double()
    flat_features = features.reshape(features.shape[0], n).double()
    on_boundary = boundary.reshape(n)
    sources, targets = grid_pairs(height, width, radius)
    weights = affinities(flat_features, sources, targets) ** beta

    # Stage 1: both ends off the boundary.
    inner = ~on_boundary[sources] & ~on_boundary[targets] & ~path_crosses(boundary, sources, targets)
    step = transition_matrix(n, sources[inner], targets[inner], weights[inner])
    for _ in range(log_t):
        step = step @ step
    stage1 = flat_maps @ step

    # Stage 2: among boundary pixels, and from non-boundary into boundary pixels.
    into_boundary = on_boundary[targets]
    step2 = transition_matrix(n, sources[into_boundary], targets[into_boundary], weights[into_boundary])
    return (stage1 @ step2).reshape(k, height, width).to(maps.dtype)
