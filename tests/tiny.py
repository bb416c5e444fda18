"""A tiny run configuration for training tests: a few iterations of a very small model on the `dataset` fixture
(tests/conftest.py)."""

from pathlib import Path

from weakshot.config import RunConfig
from weakshot.engine.train import TrainInputs

TINY_MODEL = {
    "backbone": {"depth": 18, "widths": [8, 16, 16, 16], "blocks": [1, 1, 1, 1], "stem": "small", "norm": "bn"},
    "conv_dim": 16,
    "mask_dim": 16,
    "hidden_dim": 16,
    "num_queries": 6,
    "num_heads": 2,
    "dec_layers": 2,
    "dim_feedforward": 32,
    "dropout": 0.1,  # exercises the torch RNG, which a resumed run must restore
}


def tiny_run(**overrides) -> RunConfig:
    data = {
        "method": {"supervision": "weak"},
        "model": TINY_MODEL,
        "augment": {"crop_size": 32, "test_size": 32},
        "loss": {"complementary_weight": 0.15},
        "similarity": {"pairing": "cross", "base_points": 6, "novel_points": 6, "simnet_width": 8},
        "train": {"iterations": 6, "batch_size": 2, "lr": 1e-3, "num_workers": 0, "checkpoint_every": 2,
                  "log_every": 1, "seed": 1},
    }  # fmt: skip
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return RunConfig.from_dict(data)


def inputs(dataset: dict[str, Path], out_dir: Path) -> TrainInputs:
    return TrainInputs(dataset["prepared"], out_dir, split=dataset["split"], image_labels=dataset["image_labels"])
