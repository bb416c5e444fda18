"""RETAB's boundary-aware random walk on constructed cases: mass, range, and a wall no mass crosses."""

import torch

from weakshot.methods.random_walk import neighbour_pairs, path_crosses, random_walk, transition_matrix


def test_neighbour_pairs_are_symmetric_and_within_radius():
    sources, targets = neighbour_pairs(4, 5, radius=2)
    pairs = set(zip(sources.tolist(), targets.tolist()))
    assert all((j, i) in pairs for i, j in pairs) and all(i != j for i, j in pairs)
    for i, j in pairs:
        (yi, xi), (yj, xj) = divmod(i, 5), divmod(j, 5)
        assert (yi - yj) ** 2 + (xi - xj) ** 2 <= 4
    assert (0, 10) in pairs and (0, 6) in pairs and (0, 11) not in pairs  # (2, 0), (1, 1) in; (2, 1) is sqrt(5)


def test_transition_matrix_conserves_a_walkers_mass():
    torch.manual_seed(0)
    sources, targets = neighbour_pairs(5, 5, radius=2)
    weights = torch.rand(len(sources), dtype=torch.float64)
    step = transition_matrix(25, sources, targets, weights)
    torch.testing.assert_close(step.sum(0), torch.ones(25, dtype=torch.float64))
    p = torch.rand(25, dtype=torch.float64)
    for _ in range(5):
        p_next = step @ p
        torch.testing.assert_close(p_next.sum(), p.sum())
        p = p_next


def test_walk_keeps_constant_maps_and_the_input_range():
    torch.manual_seed(0)
    features = torch.rand(3, 6, 6)
    boundary = torch.zeros(6, 6, dtype=torch.bool)
    constant = torch.full((1, 6, 6), 0.7)
    torch.testing.assert_close(random_walk(constant, features, boundary, radius=2, log_t=3), constant)
    maps = torch.rand(2, 6, 6)
    out = random_walk(maps, features, boundary, radius=2, log_t=3)
    assert (out >= maps.amin((1, 2), keepdim=True) - 1e-6).all()
    assert (out <= maps.amax((1, 2), keepdim=True) + 1e-6).all()
    assert out.std() < maps.std()  # it diffuses


def test_walk_does_not_cross_a_boundary_wall():
    # An 8 x 8 grid cut by a vertical boundary column at x = 3; activation only on the left.
    features = torch.zeros(2, 8, 8)  # identical features: affinity 1 everywhere, only the wall can stop mass
    boundary = torch.zeros(8, 8, dtype=torch.bool)
    boundary[:, 3] = True
    maps = torch.zeros(1, 8, 8)
    maps[0, :, :3] = 1.0
    out = random_walk(maps, features, boundary, radius=2, log_t=4)[0]
    assert torch.all(out[:, 4:] == 0)  # nothing reaches the right side, even at radius 2 over a 1-px wall
    torch.testing.assert_close(out[:, :3], torch.ones(8, 3))  # the left side is uniform already
    assert torch.all(out[:, 3] > 0)  # stage 2 fills the wall from its neighbours
    without_wall = random_walk(maps, features, torch.zeros(8, 8, dtype=torch.bool), radius=2, log_t=4)[0]
    assert torch.all(without_wall[:, 4:] > 0)


def test_path_crosses_finds_the_wall_between_pair_ends():
    boundary = torch.zeros(5, 5, dtype=torch.bool)
    boundary[2, :] = True
    sources, targets = neighbour_pairs(5, 5, radius=2)
    crosses = path_crosses(boundary, sources, targets)
    for i, j, c in zip(sources.tolist(), targets.tolist(), crosses.tolist()):
        (yi, _), (yj, _) = divmod(i, 5), divmod(j, 5)
        if 2 in (yi, yj):
            continue  # an end on the wall: the walk drops the pair anyway
        assert c == ((yi < 2 < yj) or (yj < 2 < yi)), (divmod(i, 5), divmod(j, 5))
