"""The training engine: a killed run resumes to the same weights as an uninterrupted one; prediction writes
a result file the evaluator reads."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny import inputs, tiny_run

from weakshot.data.classes import ClassTable
from weakshot.data.dataset import TestDataset, evaluation_loader
from weakshot.engine import predict as predict_module
from weakshot.engine.predict import load_model, predict_folder, predict_label_maps
from weakshot.engine.train import TrainInputs, lr_factor, train
from weakshot.evaluation.evaluate import evaluate_result_file


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resumed_run_ends_with_the_same_weights(dataset, tmp_path):
    run = tiny_run()
    uninterrupted = train(run, inputs(dataset, tmp_path / "a"))

    stopped = train(run, inputs(dataset, tmp_path / "b"), stop_at=3)  # a "kill" after iteration 3
    assert stopped.name == "checkpoint.pt" and not (tmp_path / "b" / "model.pt").exists()
    resumed = train(run, inputs(dataset, tmp_path / "b"))

    first, second = weights(uninterrupted), weights(resumed)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert torch.equal(weights(tmp_path / "a" / "simnet.pt")["simnet.head.weight"],
                       weights(tmp_path / "b" / "simnet.pt")["simnet.head.weight"])  # fmt: skip
    # The log of the resumed run is whole: iterations 1..6 once each, equal to the uninterrupted log.
    log_a = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in log_b] == [1, 2, 3, 4, 5, 6]
    assert log_a == log_b
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_a_checkpoint_of_another_run_config_is_not_resumed(dataset, tmp_path, capsys):
    # A run killed under one config, then run again after the config changed: continuing the old run would
    # write a model that neither config describes. It starts again and ends as a fresh run of the new config.
    old, new = tiny_run(), tiny_run(train={"lr": 5e-4})
    fresh = train(new, inputs(dataset, tmp_path / "fresh"))
    train(old, inputs(dataset, tmp_path / "b"), stop_at=3)
    capsys.readouterr()
    restarted = train(new, inputs(dataset, tmp_path / "b"))
    err = capsys.readouterr().err
    assert "not resuming" in err and "train.lr: 0.001 -> 0.0005" in err and "resumed from" not in err
    first, second = weights(fresh), weights(restarted)
    assert all(torch.equal(first[key], second[key]) for key in first)
    log = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in log] == [1, 2, 3, 4, 5, 6]


def test_a_run_resumes_across_a_change_of_settings_that_do_not_touch_the_weights(dataset, tmp_path, capsys):
    uninterrupted = train(tiny_run(), inputs(dataset, tmp_path / "a"))
    train(tiny_run(), inputs(dataset, tmp_path / "b"), stop_at=3)
    capsys.readouterr()
    resumed = train(tiny_run(train={"log_every": 3, "checkpoint_every": 4}), inputs(dataset, tmp_path / "b"))
    assert "resumed from" in capsys.readouterr().err
    first, second = weights(uninterrupted), weights(resumed)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_sigkilled_cli_run_resumes_from_its_checkpoint(dataset, tmp_path):
    """A real kill: the CLI process is SIGKILLed once a checkpoint exists, then run again to the end."""
    run = tiny_run(train={"iterations": 40, "checkpoint_every": 2})
    command = [
        sys.executable, "-m", "weakshot", "train", "--run-config", json.dumps(run.to_dict()),
        "--prepared", str(dataset["prepared"]), "--split", str(dataset["split"]),
        "--image-labels", str(dataset["image_labels"]), "--out-dir", str(tmp_path / "m"), "--threads", "1",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "m" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"training ended before it could be killed: {process.stderr.read()}"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 0 < killed_at < 40 and not (tmp_path / "m" / "model.pt").exists()

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"resumed from {checkpoint} at iteration" in result.stderr
    assert (tmp_path / "m" / "model.pt").exists() and not checkpoint.exists()
    log = [json.loads(line)["iteration"] for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 41))


def test_oracle_prediction_is_scored_by_the_evaluator(dataset, tmp_path):
    run = tiny_run(method={"supervision": "full"}, similarity={"pairing": "none"}, train={"iterations": 2})
    model = train(run, TrainInputs(dataset["prepared"], tmp_path / "oracle"))
    saved = yaml.safe_load((tmp_path / "oracle" / "config.yaml").read_text())
    assert saved["method"]["supervision"] == "full" and saved["num_classes"] == 44
    predictions = tmp_path / "oracle.json"
    classes = dataset["prepared"] / "classes.yaml"
    masks = tmp_path / "masks"
    count = predict_folder(
        model.parent, dataset["prepared"] / "images" / "test", predictions, classes=classes, masks_dir=masks
    )
    assert count == 4
    pngs = sorted(masks.glob("*.png"))
    assert len(pngs) == 4
    from PIL import Image

    from weakshot.evaluation.results import read_results

    decoded = read_results(predictions, ClassTable.load(classes).dataset_id_to_id())
    with Image.open(pngs[0]) as mask:
        assert mask.mode == "P"  # palette index = class id: the colour mask and the result file agree
        assert (np.asarray(mask) == decoded[pngs[0].stem]).all()
    metrics = evaluate_result_file(
        predictions, labels_dir=dataset["prepared"] / "labels" / "test", classes=classes, split=dataset["split"],
        out=tmp_path / "metrics.json",
    )  # fmt: skip
    assert metrics["num_images"] == 4
    assert 0.0 <= metrics["novel_mIoU"] <= 100.0


def test_batched_prediction_matches_one_image_at_a_time(dataset, tmp_path, monkeypatch):
    """Evaluation batches hold images of one padded size, so each image is segmented as at batch 1."""
    run = tiny_run(method={"supervision": "full"}, similarity={"pairing": "none"}, train={"iterations": 2})
    model_dir = train(run, TrainInputs(dataset["prepared"], tmp_path / "oracle")).parent
    model, run = load_model(model_dir, torch.device("cpu"))
    test_set = TestDataset(dataset["prepared"], "test", run.augment.test_size)
    assert len(evaluation_loader(test_set)) == 1  # the four 32 px test images in one batch

    batched = list(predict_label_maps(model, run, test_set, torch.device("cpu")))
    monkeypatch.setattr(predict_module, "evaluation_loader", functools.partial(evaluation_loader, batch_size=1))
    single = list(predict_label_maps(model, run, test_set, torch.device("cpu")))

    assert [name for name, *_ in batched] == [name for name, *_ in single] == test_set.names
    for (_, labels_b, scores_b), (_, labels_1, scores_1) in zip(batched, single):
        assert scores_b.shape == scores_1.shape
        torch.testing.assert_close(scores_b, scores_1, rtol=1e-4, atol=1e-6)
        top2 = scores_1.topk(2, dim=0).values
        clear = (top2[0] - top2[1] > 1e-4).numpy()  # labels may differ only where two classes all but tie
        assert clear.mean() > 0.9 and (labels_b[clear] == labels_1[clear]).all()


def test_weak_supervision_needs_a_split(dataset, tmp_path):
    with pytest.raises(ValueError, match="needs a split"):
        train(tiny_run(), TrainInputs(dataset["prepared"], tmp_path / "x"))


def test_learning_rate_warms_up_linearly_then_follows_the_poly_decay():
    iterations, power, warmup = 100, 0.9, 10
    factors = [lr_factor(i, iterations, power, warmup) for i in range(iterations)]
    # warm-up: (i + 1) / warmup of the poly value, reaching it at iteration warmup - 1
    assert factors[0] == pytest.approx(0.1 * (1 - 0 / iterations) ** power)
    assert factors[4] == pytest.approx(0.5 * (1 - 4 / iterations) ** power)
    assert all(a < b for a, b in zip(factors[: warmup - 1], factors[1:warmup]))
    # after it, exactly the poly schedule, decreasing to near zero
    for i in range(warmup - 1, iterations):
        assert factors[i] == pytest.approx((1 - i / iterations) ** power)
    assert all(a > b for a, b in zip(factors[warmup:-1], factors[warmup + 1 :]))
    # no warm-up: the poly schedule from the first iteration
    assert lr_factor(0, iterations, power, 0) == 1.0
