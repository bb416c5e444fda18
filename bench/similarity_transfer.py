"""How well SimNet's pixel-pair similarity, learned on base pixels, transfers to novel pixels (test images).

Pixel-pixel similarity transfer (SimFormer §3.4) rests on one assumption: a network that learns "same class or
not" from pairs of base pixels also judges pairs of novel pixels. This measures it on a trained SimFormer model
(Self-Pair or Cross-Pair: a model folder with ``simnet.pt``): every test image's pixel embeddings
(``mask_features``) are paired, and SimNet's verdicts (P(same) > 0.5, running batch-norm statistics) are scored
against the ground truth, separately for base-base and novel-novel pairs, within an image and across random
pairs of images (the distillation loss pairs two images that share a novel class).

    python bench/similarity_transfer.py --model results/embedded/models/cross_pair/split4/seed0 \\
        --prepared results/embedded/prepared --split results/embedded/splits/split4.yaml

Prints, per kind of pair, the accuracy on same-class pairs, on different-class pairs and their mean (the
balanced accuracy; 50 % is chance).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from weakshot.data.dataset import SegmentationDataset, TestDataset
from weakshot.data.splits import load_split
from weakshot.engine.checkpoint import load_weights
from weakshot.engine.predict import evaluation_outputs, load_model
from weakshot.losses.matcher import nearest_downsample
from weakshot.losses.pixel_similarity import PixelSimilarityLoss, SimNet


def pixel_embeddings(model_dir: Path, prepared: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], SimNet]:
    """Per test image: the pixel embeddings (N x D) and their ground-truth classes (N), and the trained SimNet."""
    if not (model_dir / "simnet.pt").is_file():
        raise SystemExit(f"{model_dir}: no simnet.pt (a Basic Model or fully supervised model has no SimNet)")
    device = torch.device("cpu")
    model, run = load_model(model_dir, device)
    # simnet.pt is the state of the similarity loss that owns SimNet, as training builds and saves it.
    similarity = PixelSimilarityLoss(run.similarity, run.model.mask_dim)
    load_weights(model_dir / "simnet.pt", similarity)
    simnet = similarity.simnet.eval()
    images = TestDataset(prepared, "test", test_size=run.augment.test_size)
    labelled = SegmentationDataset(prepared, "test", cache_bytes=0)
    features, classes = [], []
    for batch, _, outputs in evaluation_outputs(model, run, images, device, ("mask_features",)):
        embedding = outputs["mask_features"][0]  # D x h x w
        h, w = batch["image_size"][0]
        _, label = labelled.load(labelled.index_of(batch["names"][0]))
        if label.shape != (h, w):
            raise ValueError(f"{prepared}: test images must not be resized for this benchmark (test_size)")
        small = nearest_downsample(torch.from_numpy(np.array(label)), tuple(embedding.shape[-2:]))
        features.append(embedding.flatten(1).T)
        classes.append(small.flatten().long())
    return features, classes, simnet


def score(simnet: SimNet, a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, tally: dict) -> None:
    """Add SimNet's verdicts on all pairs (a_i, b_j) to ``tally`` = {"same": [right, n], "different": [...]}."""
    with torch.no_grad():
        verdict = simnet.pair_probs(a[None], b[None], stats="running")[0] > 0.5
    tally["same"][0] += int((verdict & same).sum())
    tally["same"][1] += int(same.sum())
    tally["different"][0] += int((~verdict & ~same).sum())
    tally["different"][1] += int((~same).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a Self-Pair or Cross-Pair model folder")
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--cross-images", type=int, default=2000, help="pairs of test images to score")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    split = load_split(args.split)
    features, classes, simnet = pixel_embeddings(args.model, args.prepared)
    groups = {"base": torch.tensor(split["base_ids"]), "novel": torch.tensor(split["novel_ids"])}
    kinds = [(where, group) for where in ("within an image", "across images") for group in groups]
    tallies = {kind: {"same": [0, 0], "different": [0, 0]} for kind in kinds}

    def add(where: str, i: int, j: int) -> None:
        for group, ids in groups.items():
            keep_a, keep_b = torch.isin(classes[i], ids), torch.isin(classes[j], ids)
            if keep_a.any() and keep_b.any():
                same = classes[i][keep_a][:, None] == classes[j][keep_b][None, :]
                score(simnet, features[i][keep_a], features[j][keep_b], same, tallies[(where, group)])

    for i in range(len(features)):
        add("within an image", i, i)
    rng = np.random.default_rng(args.seed)
    for _ in range(args.cross_images):
        i, j = rng.choice(len(features), size=2, replace=False)
        add("across images", int(i), int(j))

    print(f"{args.model}: SimNet verdicts on test pixel pairs (P(same) > 0.5)")
    print(f"{'pairs':<32} {'same-class':>11} {'different':>11} {'balanced':>9} {'pairs':>12}")
    for (where, group), tally in tallies.items():
        same = tally["same"][0] / max(tally["same"][1], 1)
        different = tally["different"][0] / max(tally["different"][1], 1)
        count = tally["same"][1] + tally["different"][1]
        print(
            f"{group + '-' + group + ', ' + where:<32} {100 * same:10.1f}% {100 * different:10.1f}%"
            f" {50 * (same + different):8.1f}% {count:12,d}"
        )


if __name__ == "__main__":
    main()
