"""Reference-image selection for cross-image pixel similarity (SimFormer's ``PAIR_TYPE: Deconf0.01``).

SimFormer precomputes, from the whole-image class presence of the training ground truth, three candidate
lists per image F (novel classes N_F, base classes B_F):

* ``deconf[n]`` for every n in N_F: the images C with N_F ∩ N_C = {n} -- they share exactly one novel class
  with F, so a novel pixel pair across F and C that SimNet calls "similar" can only be class n ("de-
  confused"); capped at 500 by random deletion.
* ``novel_common``: see ``novel_common_rule`` below; capped at 50.
* ``base_common``: the images sharing at least one base class; capped at 50.

and at training time draws one reference per input (:class:`ReferenceSampler`).

Decisions (SimFormer §8 quirk 3 and the ``novel_common`` condition):

* ``novel_common_rule="simformer"`` (default) reproduces SimFormer's condition: the list is filled only when
  F has >= 2 novel classes, with every candidate that does NOT share exactly one novel class (including the
  ones sharing none). ``"shared2"`` is the presumable intent, candidates sharing >= 2 novel classes. Under
  Deconf sampling the list is inert either way: the sampler reads ``novel_common`` only for images with 0 or
  1 novel class, and both rules leave it empty for exactly those images. So the default costs nothing and
  keeps the stored index comparable with SimFormer's; the flag only matters to other pair types.
* Quirk 3, single-novel-class images: SimFormer's sampler enters the deconf branch only for >= 2 novel
  classes, so an image with exactly one novel class falls through to ``base_common`` and is paired through
  a shared base class; such pairs rarely share a novel class, so those images get almost no DistLoss. This
  is kept as the default (``pair_single_novel=False``) because it is what produced SimFormer's numbers;
  ``ReferenceSampler(..., pair_single_novel=True)`` pairs them through their novel class instead (their
  ``deconf`` list, built for every image with >= 1 novel class as SimFormer does, holds exactly the images
  containing that class), falling back to the SimFormer route when that list is empty.
* Self: SimFormer's lists include F itself (its candidate loop runs over all images) and the sampler drops
  F when >= 2 candidates remain. Here F is excluded when the lists are built, so it takes no capped slot;
  the sampler still applies SimFormer's rule, so an index that does contain F behaves the same.
* Caps: SimFormer deletes a random element whenever a set grows past its cap while scanning; the result is
  a random subset of the cap's size. Here it is a uniform random subset drawn from ``rng_seed`` (SimFormer's
  was unseeded), stored sorted. (The cap is a storage device: one draw from a uniform random 500-subset is
  a uniform draw from the full list, and an image is an input only ~30 times in a paper-length run.)

Storage: lists hold image indices (int32 numpy arrays in memory, plain lists in JSON) into ``index
["images"]``. At paper scale (20k ADE images, ~2 novel classes each, up to 500 references per class) that
is ~10^7 entries: as Python lists of names it would cost gigabytes in every data-loader worker; as numpy
arrays it is tens of megabytes, shared copy-on-write by forked workers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from weakshot.io_utils import write_text

FORMAT = "weakshot-pair-index/1"
DEFAULT_CAPS = (500, 50, 50)  # deconf, novel_common, base_common (SimFormer's compute_pairs.py)
NOVEL_COMMON_RULES = ("simformer", "shared2")


def build_pair_index(
    image_labels: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    rng_seed: int,
    caps: tuple[int, int, int] = DEFAULT_CAPS,
    novel_common_rule: str = "simformer",
) -> dict[str, Any]:
    """Candidate references of every image, from whole-image class presence.

    ``image_labels``: image name -> (base class ids, novel class ids) present in its ground truth.
    Returns ``{"format", "seed", "caps", "novel_common_rule", "images": [names], "entries": {name: {"base":
    [ids], "novel": [ids], "deconf": {novel id: int32 array}, "novel_common": int32 array, "base_common":
    int32 array}}}``; arrays hold indices into ``images``.

    Vectorised with bitsets (one uint64 word per 64 classes and image):

    * ``deconf[n]``: the images containing n (precomputed per class) whose novel bits meet F's other novel
      bits nowhere -- one AND over that member list, once per group of images with the same novel set.
    * ``novel_common``: one count of shared novel classes per group (a scatter-add over its classes' member
      lists), then ``shared != 1`` (SimFormer) or ``shared >= 2``.
    * ``base_common`` is a long list for most images (most share "wall" or "sky") cut to 50: the 50 are
      found by rejection sampling for all images at once (:func:`_sample_where`), a uniform random 50-subset
      without listing anyone's candidates; rows with few candidates list them exactly.
    """
    if novel_common_rule not in NOVEL_COMMON_RULES:
        raise ValueError(f"novel_common_rule must be one of {NOVEL_COMMON_RULES}, not {novel_common_rule!r}")
    cap_deconf, cap_novel, cap_base = (int(c) for c in caps)
    if min(cap_deconf, cap_novel, cap_base) < 1:
        raise ValueError(f"caps must be >= 1, got {tuple(caps)}")
    names = list(image_labels)
    n = len(names)
    base_sets = [sorted({int(c) for c in image_labels[name][0]}) for name in names]
    novel_sets = [sorted({int(c) for c in image_labels[name][1]}) for name in names]
    for name, b, v in zip(names, base_sets, novel_sets):
        if set(b) & set(v):
            raise ValueError(f"{name}: classes {sorted(set(b) & set(v))} listed as both base and novel")

    base_bits, _ = _bitsets(base_sets)
    novel_bits, novel_bit = _bitsets(novel_sets)
    members = _members(novel_sets)
    member_bits = {c: novel_bits[images] for c, images in members.items()}
    rng = np.random.default_rng(rng_seed)

    # deconf and novel_common depend on the image only through its novel set: computed once per group of
    # images with the same set (groups in a fixed order for determinism); only the capping is per image.
    deconf: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
    novel_common: dict[int, np.ndarray] = {}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, novel in enumerate(novel_sets):
        if novel:
            groups.setdefault(tuple(novel), []).append(i)
    for key in sorted(groups):
        group = groups[key]
        for c in key:
            others = novel_bits[group[0]] & ~novel_bit[c]
            candidates = members[c][((member_bits[c] & others) == 0).all(1)]
            for i in group:
                deconf[i][c] = _capped(candidates, i, cap_deconf, rng)
        if len(key) >= 2:  # SimFormer fills novel_common only for images with >= 2 novel classes
            shared = np.zeros(n, dtype=np.int16)  # novel classes each image shares with the group's set
            for c in key:
                shared[members[c]] += 1
            if novel_common_rule == "simformer":  # every candidate NOT sharing exactly one novel class
                candidates = np.flatnonzero(shared != 1).astype(np.int32)
            else:  # candidates sharing >= 2 novel classes
                candidates = np.flatnonzero(shared >= 2).astype(np.int32)
            for i in group:
                novel_common[i] = _capped(candidates, i, cap_novel, rng)

    base_members = _members(base_sets)
    base_common = _sample_where(
        lambda rows, cols: (base_bits[rows] & base_bits[cols]).any(-1),
        lambda i: _union(base_members, base_sets[i], n),
        np.flatnonzero([len(v) >= 1 for v in base_sets]),
        n,
        cap_base,
        rng,
    )

    empty = np.zeros(0, dtype=np.int32)
    entries = {
        name: {
            "base": base_sets[i],
            "novel": novel_sets[i],
            "deconf": deconf[i],
            "novel_common": novel_common.get(i, empty),
            "base_common": base_common.get(i, empty),
        }
        for i, name in enumerate(names)
    }
    return {
        "format": FORMAT,
        "seed": int(rng_seed),
        "caps": [cap_deconf, cap_novel, cap_base],
        "novel_common_rule": novel_common_rule,
        "images": names,
        "entries": entries,
    }


def _bitsets(sets: list[list[int]]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Per-image class bitsets ``n x W`` (uint64, W = ceil(#classes / 64)) and each class's own bitset."""
    classes = sorted({c for s in sets for c in s})
    column = {c: k for k, c in enumerate(classes)}
    words = max(1, -(-len(classes) // 64))
    bits = np.zeros((len(sets), words), dtype=np.uint64)
    rows = np.array([i for i, s in enumerate(sets) for _ in s], dtype=np.int64)
    cols = np.array([column[c] for s in sets for c in s], dtype=np.int64)
    np.bitwise_or.at(bits, (rows, cols // 64), np.left_shift(np.uint64(1), (cols % 64).astype(np.uint64)))
    single = {}
    for c, k in column.items():
        one = np.zeros(words, dtype=np.uint64)
        one[k // 64] = np.uint64(1) << np.uint64(k % 64)
        single[c] = one
    return bits, single


def _members(sets: list[list[int]]) -> dict[int, np.ndarray]:
    """Class id -> sorted indices of the images containing it."""
    out: dict[int, list[int]] = {}
    for i, s in enumerate(sets):
        for c in s:
            out.setdefault(c, []).append(i)
    return {c: np.asarray(v, dtype=np.int32) for c, v in out.items()}


def _union(members: dict[int, np.ndarray], classes: list[int], n: int) -> np.ndarray:
    """Sorted int32 indices of the images containing any of ``classes``."""
    mask = np.zeros(n, dtype=bool)
    for c in classes:
        mask[members[c]] = True
    return np.flatnonzero(mask).astype(np.int32)


def _capped(candidates: np.ndarray, self_index: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """``candidates`` (sorted int32 image indices) without ``self_index``, reduced to a uniform random subset
    of at most ``cap`` entries; sorted int32."""
    size = len(candidates)
    at = int(np.searchsorted(candidates, self_index))
    has_self = at < size and candidates[at] == self_index
    if size - has_self <= cap:
        return np.delete(candidates, at) if has_self else candidates
    # Positions of a uniform cap-subset of the list without self: draw among size - 1 slots and step over it.
    positions = np.sort(rng.choice(size - has_self, cap, replace=False, shuffle=False))
    if has_self:
        positions[positions >= at] += 1
    return candidates[positions]


def _sample_where(
    test: Callable[[np.ndarray, np.ndarray], np.ndarray],
    exact: Callable[[int], np.ndarray],
    rows: np.ndarray,
    n: int,
    cap: int,
    rng: np.random.Generator,
    chunk: int = 4096,
) -> dict[int, np.ndarray]:
    """For each image ``i`` in ``rows``: a uniform random subset of at most ``cap`` images ``r != i`` with
    ``test(i, r)`` true (sorted int32). ``test`` broadcasts over index arrays; ``exact(i)`` lists the
    candidates of ``i`` (sorted, self allowed).

    Rejection sampling for all rows at once: 4*cap i.i.d. uniform draws per row, restricted to the accepted
    ones, are i.i.d. uniform over the row's candidates, so their first ``cap`` distinct values (in draw
    order) are a uniform ``cap``-subset. Rows whose draws give fewer -- few candidates, which is when
    listing them is cheap -- use ``exact`` instead.
    """
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(rows), chunk):
        block = rows[start : start + chunk]
        draws = rng.integers(0, n, size=(len(block), 4 * cap))
        ok = test(block[:, None], draws) & (draws != block[:, None])
        chosen, complete = _first_distinct_rows(np.where(ok, draws, -1), cap)
        for i, values, done in zip(block.tolist(), chosen, complete):
            out[i] = values.astype(np.int32) if done else _capped(exact(i), i, cap, rng)
    return out


def _first_distinct_rows(values: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``values`` (``R x m``, -1 = rejected draw): the first ``cap`` distinct non-negative values
    in column order, sorted (``R x cap``), and whether the row had that many."""
    m = values.shape[1]
    order = np.argsort(values, axis=1, kind="stable")  # equal values keep draw order
    ordered = np.take_along_axis(values, order, 1)
    first = np.ones_like(ordered, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered >= 0
    draw_index = np.sort(np.where(first, order, m), axis=1)[:, :cap]  # earliest first occurrences
    complete = draw_index[:, cap - 1] < m
    chosen = np.sort(np.take_along_axis(values, np.minimum(draw_index, m - 1), 1), axis=1)
    return chosen, complete


# --- JSON ------------------------------------------------------------------------------------------------


def save_pair_index(index: Mapping[str, Any], path: str | Path) -> None:
    """Write the index as compact JSON (atomically, via ``io_utils``).

    Compact separators rather than ``write_json``'s indentation: with one index per line the file would be
    several times larger (~10^7 integers at ADE scale) for no reader's benefit.
    """
    entries = {
        name: {
            "base": [int(c) for c in e["base"]],
            "novel": [int(c) for c in e["novel"]],
            "deconf": {str(c): np.asarray(v).tolist() for c, v in e["deconf"].items()},
            "novel_common": np.asarray(e["novel_common"]).tolist(),
            "base_common": np.asarray(e["base_common"]).tolist(),
        }
        for name, e in index["entries"].items()
    }
    data = {key: index[key] for key in ("format", "seed", "caps", "novel_common_rule", "images")}
    data["images"] = list(data["images"])
    data["entries"] = entries
    write_text(path, json.dumps(data, separators=(",", ":")) + "\n")


def load_pair_index(path: str | Path) -> dict[str, Any]:
    """Read an index written by :func:`save_pair_index` (lists back to int32 arrays, class keys to int)."""
    path = Path(path)
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pair index of format {FORMAT!r} (found {data.get('format')!r})")
    for e in data["entries"].values():
        e["deconf"] = {int(c): np.asarray(v, dtype=np.int32) for c, v in e["deconf"].items()}
        e["novel_common"] = np.asarray(e["novel_common"], dtype=np.int32)
        e["base_common"] = np.asarray(e["base_common"], dtype=np.int32)
    return data


# --- sampling --------------------------------------------------------------------------------------------


class ReferenceSampler:
    """Draws the reference image of an input (SimFormer's ``sample_pair_img``, ``Deconf<rare_prob>``).

    * >= 2 novel classes (or >= 1 with ``pair_single_novel``): pick a novel class -- with probability
      ``rare_prob`` the one with the fewest deconf candidates (an empty list counts as the deconf cap, as in
      SimFormer, so the rare pick avoids dead classes), otherwise uniformly -- and draw the reference
      uniformly from its deconf list. An empty list gives the image itself (SimFormer), except for the
      ``pair_single_novel`` case, which falls back to the route below.
    * otherwise: ``novel_common`` if it has >= 2 entries, else ``base_common`` if it has >= 2, else the
      image itself.
    * The image itself is removed from the chosen list when >= 2 candidates remain (without mutating the
      stored list, unlike SimFormer's ``set.remove``).

    All randomness comes from the caller's ``random.Random``, so a seeded rng gives a reproducible draw.
    """

    def __init__(self, index: Mapping[str, Any], rare_prob: float = 0.01, pair_single_novel: bool = False) -> None:
        self.images: list[str] = list(index["images"])
        self.position = {name: i for i, name in enumerate(self.images)}
        self.entries = index["entries"]
        self.rare_prob = rare_prob
        self.pair_single_novel = pair_single_novel
        self.empty_count = int(index["caps"][0])

    def sample(self, name: str, rng: random.Random) -> str:
        entry = self.entries[name]
        deconf = entry["deconf"]
        classes = sorted(deconf)
        min_classes = 1 if self.pair_single_novel else 2
        if len(classes) >= min_classes:
            if len(classes) >= 2 and rng.random() < self.rare_prob:
                counts = [len(deconf[c]) or self.empty_count for c in classes]
                chosen = classes[counts.index(min(counts))]
            else:
                chosen = classes[rng.randrange(len(classes))]
            reference = self._draw(name, deconf[chosen], rng)
            if reference is not None:
                return reference
            if len(classes) >= 2:
                return name
        for key in ("novel_common", "base_common"):
            if len(entry[key]) >= 2:
                reference = self._draw(name, entry[key], rng)
                return name if reference is None else reference
        return name

    def _draw(self, name: str, candidates: np.ndarray, rng: random.Random) -> str | None:
        """Uniform draw from ``candidates`` (image indices), the image itself removed when >= 2 remain;
        None when empty."""
        candidates = np.asarray(candidates)
        if len(candidates) >= 2:
            me = self.position.get(name)
            if me is not None and (candidates == me).any():
                candidates = candidates[candidates != me]
        if len(candidates) == 0:
            return None
        return self.images[int(candidates[rng.randrange(len(candidates))])]
