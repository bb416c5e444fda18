"""Reference-image selection (SimFormer's Deconf0.01): index construction, sampling, JSON round trip."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from weakshot.data.pairs import (
    ReferenceSampler,
    _sample_where,
    build_pair_index,
    load_pair_index,
    save_pair_index,
)

# name -> (base ids, novel ids). Novel classes 50, 51, 52; base 1..4.
TABLE = {
    "multi": ([1], [50, 51]),  # two novel classes
    "n50": ([2], [50]),  # shares exactly {50} with "multi"
    "n51": ([3], [51]),  # shares exactly {51}
    "n50_52": ([1], [50, 52]),  # shares exactly {50} with "multi"; with "n52" exactly {52}
    "n52": ([4], [52]),
    "both": ([2], [50, 51]),  # shares {50, 51} with "multi": not a deconf candidate of it
    "plain": ([1, 2], []),  # no novel class
    "plain2": ([2], []),
    "lonely": ([9], []),  # its base class is in no other image, no novel class
}


def _brute_force(table: dict, rule: str = "simformer") -> dict:
    """Uncapped candidate sets, straight from the definitions (self excluded)."""
    out = {}
    for name, (base, novel) in table.items():
        deconf = {c: set() for c in novel}
        novel_common, base_common = set(), set()
        for other, (obase, onovel) in table.items():
            if other == name:
                continue
            shared = set(novel) & set(onovel)
            if len(shared) == 1:
                deconf[shared.pop()].add(other)
            if rule == "simformer" and len(novel) >= 2 and len(set(novel) & set(onovel)) != 1:
                novel_common.add(other)
            if rule == "shared2" and len(set(novel) & set(onovel)) >= 2:
                novel_common.add(other)
            if set(base) & set(obase):
                base_common.add(other)
        out[name] = (deconf, novel_common, base_common)
    return out


def _names(index: dict, positions) -> set[str]:
    return {index["images"][int(i)] for i in positions}


def _random_table(n: int, seed: int, num_classes: int = 40, num_novel: int = 10) -> dict:
    rng = np.random.default_rng(seed)
    freq = np.clip(0.6 / np.arange(1, num_classes + 1) ** 0.7, 0.02, 0.9)
    novel = set(rng.choice(num_classes, num_novel, replace=False).tolist())
    table = {}
    for i in range(n):
        present = np.flatnonzero(rng.random(num_classes) < freq).tolist()
        table[f"im{i:05d}"] = ([c for c in present if c not in novel], [c for c in present if c in novel])
    return table


# --- construction ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["simformer", "shared2"])
def test_index_matches_brute_force_when_uncapped(rule: str) -> None:
    table = _random_table(150, seed=3)
    index = build_pair_index(table, rng_seed=0, caps=(10_000, 10_000, 10_000), novel_common_rule=rule)
    expected = _brute_force(table, rule)
    for name, (deconf, novel_common, base_common) in expected.items():
        entry = index["entries"][name]
        assert set(entry["deconf"]) == set(deconf)
        for c, members in deconf.items():
            assert _names(index, entry["deconf"][c]) == members
        assert _names(index, entry["novel_common"]) == novel_common
        assert _names(index, entry["base_common"]) == base_common
        for key in ("novel_common", "base_common"):
            assert list(entry[key]) == sorted(entry[key])


def test_caps_give_random_subsets_of_the_right_size() -> None:
    table = _random_table(400, seed=4)
    expected = _brute_force(table)
    index = build_pair_index(table, rng_seed=1, caps=(20, 5, 7))
    for name, (deconf, novel_common, base_common) in expected.items():
        entry = index["entries"][name]
        for c, members in deconf.items():
            got = _names(index, entry["deconf"][c])
            assert got <= members and len(got) == min(20, len(members))
        got = _names(index, entry["novel_common"])
        assert got <= novel_common and len(got) == min(5, len(novel_common))
        got = _names(index, entry["base_common"])
        assert got <= base_common and len(got) == min(7, len(base_common))
        assert name not in _names(index, entry["base_common"])


def test_rejection_subsets_are_uniform() -> None:
    # Candidates of image 0: the even images 2..58 (29 of them); cap 6 -> each is picked with p = 6/29.
    n = 60

    def test(rows, cols):
        return (cols % 2 == 0) & (rows >= 0)

    counts = np.zeros(n)
    rng = np.random.default_rng(0)
    trials = 3000
    for _ in range(trials):
        chosen = _sample_where(test, lambda i: np.arange(2, n, 2), np.array([0]), n, 6, rng)[0]
        assert len(chosen) == 6 and len(set(chosen.tolist())) == 6
        counts[chosen] += 1
    assert counts[1::2].sum() == 0 and counts[0] == 0
    freq = counts[2::2] / trials
    assert np.abs(freq - 6 / 29).max() < 0.04


def test_build_is_deterministic_and_seed_dependent() -> None:
    table = _random_table(300, seed=5)
    a = build_pair_index(table, rng_seed=7, caps=(15, 5, 5))
    b = build_pair_index(table, rng_seed=7, caps=(15, 5, 5))
    c = build_pair_index(table, rng_seed=8, caps=(15, 5, 5))

    def flat(index):
        return [
            (name, key, tuple(np.asarray(v).tolist()))
            for name, e in index["entries"].items()
            for key, v in [("nc", e["novel_common"]), ("bc", e["base_common"])]
            + [(f"d{k}", w) for k, w in e["deconf"].items()]
        ]

    assert flat(a) == flat(b)
    assert flat(a) != flat(c)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        build_pair_index({"x": ([1], [1])}, rng_seed=0)
    with pytest.raises(ValueError):
        build_pair_index(TABLE, rng_seed=0, novel_common_rule="typo")
    with pytest.raises(ValueError):
        build_pair_index(TABLE, rng_seed=0, caps=(0, 1, 1))


# --- sampling --------------------------------------------------------------------------------------------


def test_reference_shares_exactly_the_chosen_novel_class() -> None:
    table = _random_table(300, seed=6)
    sampler = ReferenceSampler(build_pair_index(table, rng_seed=0))
    rng = random.Random(0)
    checked = 0
    for name, (_base, novel) in table.items():
        if len(novel) < 2:
            continue
        for _ in range(5):
            ref = sampler.sample(name, rng)
            if ref == name:  # only when the chosen class has no deconf candidate
                continue
            assert len(set(novel) & set(table[ref][1])) == 1
            checked += 1
    assert checked > 100


def test_small_table_routes() -> None:
    sampler = ReferenceSampler(build_pair_index(TABLE, rng_seed=0))
    rng = random.Random(1)
    refs = {sampler.sample("multi", rng) for _ in range(200)}
    assert refs == {"n50", "n51", "n50_52"}  # never "both" (two shared novel classes) nor itself
    # No novel class: a base-sharing reference.
    for _ in range(50):
        ref = sampler.sample("plain", rng)
        assert set(TABLE[ref][0]) & {1, 2} and ref != "plain"
    # Nothing shared at all: itself.
    assert sampler.sample("lonely", rng) == "lonely"


def test_single_novel_images_pair_through_base_unless_asked() -> None:
    table = {
        "a": ([1], [50]),
        "b": ([1], []),  # shares base 1 only
        "c": ([1], []),
        "d": ([2], [50]),  # shares novel 50 only
    }
    index = build_pair_index(table, rng_seed=0)
    rng = random.Random(0)
    simformer = ReferenceSampler(index)  # quirk 3 kept: through a shared base class
    assert {simformer.sample("a", rng) for _ in range(50)} == {"b", "c"}
    fixed = ReferenceSampler(index, pair_single_novel=True)
    assert {fixed.sample("a", rng) for _ in range(50)} == {"d"}
    # A single novel class nobody else has: the fixed sampler falls back to the base route.
    lonely = build_pair_index({"a": ([1], [50]), "b": ([1], []), "c": ([1], [])}, rng_seed=0)
    assert ReferenceSampler(lonely, pair_single_novel=True).sample("a", rng) in {"b", "c"}


def test_rare_class_pick_and_empty_deconf_list() -> None:
    table = {
        "f": ([1], [50, 51, 52]),
        "x1": ([1], [50]),
        "x2": ([1], [50]),
        "x3": ([1], [50]),
        "y1": ([1], [51]),
    }  # deconf of f: 50 -> 3 images, 51 -> 1 image, 52 -> none (counts as the cap, so never "rarest")
    index = build_pair_index(table, rng_seed=0)
    rng = random.Random(0)
    assert {ReferenceSampler(index, rare_prob=1.0).sample("f", rng) for _ in range(20)} == {"y1"}
    refs = [ReferenceSampler(index, rare_prob=0.0).sample("f", rng) for _ in range(300)]
    # Uniform over the three classes; class 52 has no candidate -> f itself (SimFormer).
    assert 60 < refs.count("f") < 140 and 60 < refs.count("y1") < 140


def test_self_is_dropped_from_lists_that_contain_it() -> None:
    index = build_pair_index({"a": ([1], []), "b": ([1], []), "c": ([1], [])}, rng_seed=0)
    # An index built elsewhere (SimFormer's) may list the image itself: it is removed when >= 2 remain.
    index["entries"]["a"]["base_common"] = np.array([0, 1], dtype=np.int32)
    rng = random.Random(0)
    assert {ReferenceSampler(index).sample("a", rng) for _ in range(20)} == {"b"}


def test_sampling_is_deterministic_given_a_seeded_rng() -> None:
    table = _random_table(200, seed=8)
    sampler = ReferenceSampler(build_pair_index(table, rng_seed=0))
    names = list(table)
    first = [sampler.sample(n, random.Random(42)) for n in names]
    again = [sampler.sample(n, random.Random(42)) for n in names]
    assert first == again
    stream_a = random.Random(5)
    stream_b = random.Random(5)
    assert [sampler.sample(n, stream_a) for n in names] == [sampler.sample(n, stream_b) for n in names]


# --- JSON ------------------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path) -> None:
    table = _random_table(120, seed=9)
    index = build_pair_index(table, rng_seed=3, caps=(30, 5, 5))
    path = tmp_path / "pairs.json"
    save_pair_index(index, path)
    loaded = load_pair_index(path)
    assert loaded["images"] == index["images"] and loaded["caps"] == [30, 5, 5] and loaded["seed"] == 3
    for name, entry in index["entries"].items():
        other = loaded["entries"][name]
        assert other["base"] == entry["base"] and other["novel"] == entry["novel"]
        assert set(other["deconf"]) == set(entry["deconf"])  # int keys again
        for c in entry["deconf"]:
            assert np.array_equal(other["deconf"][c], entry["deconf"][c])
        assert np.array_equal(other["novel_common"], entry["novel_common"])
        assert np.array_equal(other["base_common"], entry["base_common"])
    a, b = ReferenceSampler(index), ReferenceSampler(loaded)
    assert [a.sample(n, random.Random(1)) for n in table] == [b.sample(n, random.Random(1)) for n in table]
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError):
        load_pair_index(tmp_path / "bad.json")


def test_build_speed_on_a_synthetic_5k_table() -> None:
    # ADE-like: 150 classes with long-tailed frequencies, 38 of them novel (printed, not asserted).
    rng = np.random.default_rng(0)
    freq = np.clip(0.9 / np.arange(1, 151) ** 0.9, 0.003, 0.9)
    freq *= 8.5 / freq.sum()
    novel = set(rng.choice(150, 38, replace=False).tolist())
    present = rng.random((5000, 150)) < freq
    table = {}
    for i in range(5000):
        classes = np.flatnonzero(present[i]).tolist()
        table[f"ADE_{i:05d}"] = ([c for c in classes if c not in novel], [c for c in classes if c in novel])
    start = time.perf_counter()
    index = build_pair_index(table, rng_seed=0)
    seconds = time.perf_counter() - start
    entries = sum(
        sum(len(v) for v in e["deconf"].values()) + len(e["novel_common"]) + len(e["base_common"])
        for e in index["entries"].values()
    )
    print(f"\nbuild_pair_index: 5000 images x 150 classes in {seconds:.2f} s ({entries} list entries)")
    assert len(index["entries"]) == 5000
