"""Command line: one subcommand per DAG stage, ``python -m weakshot <stage> ...``.

This module only parses arguments and calls the stage's function; each stage imports its (heavy) modules
lazily so that ``--help`` and the Snakemake DAG never pay for torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def cmd_generate_embedded(args: argparse.Namespace) -> None:
    from weakshot.data.embedded import EmbeddedConfig, generate_embedded

    generate_embedded(EmbeddedConfig.from_dict(args.spec), archive=args.archive, classes=args.classes)


def cmd_download(args: argparse.Namespace) -> None:
    from weakshot.data.archives import download

    download(args.url, args.out, expected_size=args.size, sha256=args.sha256, md5=args.md5)


def cmd_extract(args: argparse.Namespace) -> None:
    from weakshot.data.archives import safe_extract

    safe_extract(args.archive, args.out)


def cmd_prepare(args: argparse.Namespace) -> None:
    from weakshot.data.classes import ClassTable

    class_table = ClassTable.load(args.classes)
    if args.layout == "coco_stuff_10k":
        from weakshot.data.cocostuff import convert_cocostuff as convert
    else:
        from weakshot.data.ade20k import convert_ade20k as convert
    convert(args.raw, args.out, class_table, exclude_train=args.exclude_train)


def cmd_image_labels(args: argparse.Namespace) -> None:
    from weakshot.data.splits import write_image_labels

    write_image_labels(args.prepared, args.out, min_pixels=args.min_pixels)


def cmd_split(args: argparse.Namespace) -> None:
    from weakshot.data.splits import SplitSpec, write_split

    write_split(args.classes, SplitSpec.from_dict(args.spec), args.name, args.out)


def cmd_split_image_labels(args: argparse.Namespace) -> None:
    from weakshot.data.splits import write_split_image_labels

    write_split_image_labels(args.image_labels, args.split, args.out)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from weakshot.evaluation.evaluate import evaluate_result_file

    evaluate_result_file(args.predictions, labels_dir=args.labels, classes=args.classes, split=args.split, out=args.out)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_train(args: argparse.Namespace) -> None:
    import os

    from weakshot.engine.launch import claim_gpus, exec_torchrun

    launched = "WORLD_SIZE" in os.environ  # a torchrun worker: the launcher below already ran
    claim = None
    if not launched and args.device in (None, "cuda"):
        claim = claim_gpus(max(args.gpus, 1))  # its lock files stay open (and inherited) until the job ends
    if args.gpus > 1 and not launched:
        exec_torchrun(args.gpus, args.argv)

    from weakshot.config import RunConfig
    from weakshot.engine.train import TrainInputs, train

    _set_threads(args.threads)
    run = RunConfig.from_dict(args.run_config, where="run config")
    inputs = TrainInputs(
        prepared=args.prepared,
        out_dir=args.out_dir,
        split=args.split,
        image_labels=args.image_labels,
        pseudo_labels=args.pseudo_labels,
        init_weights=args.init,
    )
    train(run, inputs, device=args.device)
    if claim is not None:
        claim.release()


def cmd_predict(args: argparse.Namespace) -> None:
    from weakshot.engine.predict import predict_folder

    _set_threads(args.threads)
    predict_folder(
        args.model, args.images, args.out, device=args.device, classes=args.classes, masks_dir=args.masks_dir
    )


def cmd_pseudo_labels(args: argparse.Namespace) -> None:
    from weakshot.methods.pseudo_labels import write_pseudo_labels

    _set_threads(args.threads)
    write_pseudo_labels(
        args.model, args.prepared, args.split, args.image_labels, args.out_dir, args.report, device=args.device
    )


def cmd_cam_pseudo_labels(args: argparse.Namespace) -> None:
    from weakshot.methods.cam import write_cam_pseudo_labels

    _set_threads(args.threads)
    write_cam_pseudo_labels(
        args.model, args.prepared, args.split, args.image_labels, args.out_dir, args.report,
        min_score=args.min_score, device=args.device,
    )  # fmt: skip


def cmd_retab_pseudo_labels(args: argparse.Namespace) -> None:
    from weakshot.methods.retab import write_retab_pseudo_labels

    _set_threads(args.threads)
    write_retab_pseudo_labels(
        args.cam_model, args.retab_model, args.prepared, args.split, args.image_labels, args.out_dir, args.report,
        beta=args.beta, log_t=args.log_t, device=args.device,
    )  # fmt: skip


def cmd_figure(args: argparse.Namespace) -> None:
    from weakshot.reporting.figures import write_figure

    predictions = {}
    for item in args.predictions:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--predictions: expected LABEL=FILE, got {item!r}")
        predictions[label] = Path(path)
    chosen = write_figure(args.prepared, args.split, predictions, args.out, rows=args.rows, title=args.title)
    print(f"[figure] {args.out}: rows {', '.join(chosen)}", file=sys.stderr)


def cmd_table(args: argparse.Namespace) -> None:
    from weakshot.reporting.tables import plot_against_novel_ratio, write_table

    if args.out_plot and args.splits_dir is None:
        raise ValueError("--out-plot needs --splits-dir (the novel ratio of each split)")
    table, sd = write_table(
        args.spec, args.metrics_dir, args.paper, args.out_csv, args.out_md, splits_dir=args.splits_dir
    )
    if args.out_plot:
        title = f"{args.spec['name']}: novel mIoU against novel ratio ({args.spec['dataset']})"
        plot_against_novel_ratio(table, args.out_plot, title, sd)


def _pseudo_label_arguments(p: argparse.ArgumentParser) -> None:
    """What every pseudo-labeller reads and writes (the labellers differ only in their models and knobs)."""
    p.add_argument("--prepared", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--split", type=Path, required=True, help="split YAML (base and novel ids)")
    p.add_argument("--image-labels", type=Path, required=True, help="the split's image-level labels (TSV)")
    p.add_argument("--out-dir", type=Path, required=True, help="folder of pseudo-label PNGs to write")
    p.add_argument("--report", type=Path, required=True, help="quality report (JSON) to write")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m weakshot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = sub.add_parser("generate-embedded", help="draw the embedded dataset into a raw COCO-Stuff-10K archive")
    p.add_argument("--spec", type=_json_object, required=True, help="generator settings (JSON object)")
    p.add_argument("--archive", type=Path, required=True, help="zip archive to write")
    p.add_argument("--classes", type=Path, required=True, help="class table (YAML) to write")
    p.set_defaults(func=cmd_generate_embedded)

    p = sub.add_parser("download", help="download an archive with resume, progress and checksum check")
    p.add_argument("--url", required=True, help="http(s)://, file:// or a local path")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=None, help="expected size in bytes")
    p.add_argument("--sha256", default=None)
    p.add_argument("--md5", default=None)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("extract", help="extract an archive, refusing members that would land outside --out")
    p.add_argument("--archive", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("prepare", help="convert an extracted dataset to the prepared layout")
    p.add_argument("--layout", choices=["coco_stuff_10k", "ade20k"], required=True)
    p.add_argument("--raw", type=Path, required=True, help="extracted archive folder")
    p.add_argument("--classes", type=Path, required=True, help="class table (YAML)")
    p.add_argument("--out", type=Path, required=True, help="prepared dataset folder to write")
    p.add_argument("--exclude-train", nargs="*", default=[], help="training image names to skip")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("image-labels", help="per-image class presence of a prepared dataset")
    p.add_argument("--prepared", type=Path, required=True)
    p.add_argument("--min-pixels", type=int, default=1, help="pixels a class needs to count as present")
    p.add_argument("--out", type=Path, required=True, help="TSV to write")
    p.set_defaults(func=cmd_image_labels)

    p = sub.add_parser("split", help="write one base/novel class split of a dataset")
    p.add_argument("--classes", type=Path, required=True, help="class table (YAML)")
    p.add_argument("--spec", type=_json_object, required=True, help="split settings (JSON object)")
    p.add_argument("--name", required=True, help="split name, e.g. split4")
    p.add_argument("--out", type=Path, required=True, help="split YAML to write")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("split-image-labels", help="image-level base/novel labels of one split")
    p.add_argument("--image-labels", type=Path, required=True)
    p.add_argument("--split", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_split_image_labels)

    p = sub.add_parser("train", help="train one model (oracle, base model, SimFormer variant or retraining)")
    p.add_argument("--run-config", type=_json_object, required=True, help="run settings (JSON object)")
    p.add_argument("--prepared", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--out-dir", type=Path, required=True, help="model folder to write")
    p.add_argument("--split", type=Path, default=None, help="split YAML (not for the oracle)")
    p.add_argument("--image-labels", type=Path, default=None, help="the split's image-level labels (TSV)")
    p.add_argument("--pseudo-labels", type=Path, default=None, help="folder of pseudo-label PNGs to train on")
    p.add_argument("--init", type=Path, default=None, help="model.pt to start from (method.init: base_model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (per process)")
    p.add_argument(
        "--gpus", type=int, default=1,
        help="GPUs = data-parallel processes (launched with torchrun; the rules pass their gpu resource; on CPU: "
        "gloo processes); 0 or 1: one process",
    )  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment a folder of images with a trained model (COCO result file)")
    p.add_argument("--model", type=Path, required=True, help="model folder (model.pt + config.yaml)")
    p.add_argument("--images", type=Path, required=True, help="folder of images")
    p.add_argument("--out", type=Path, required=True, help="COCO stuff-segmentation result JSON to write")
    p.add_argument("--classes", type=Path, default=None, help="class table: write its raw dataset ids")
    p.add_argument("--masks-dir", type=Path, default=None, help="also write a colour mask PNG per image here")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("pseudo-labels", help="pseudo-label the training images with a trained weak-shot model")
    p.add_argument("--model", type=Path, required=True, help="model folder (model.pt + config.yaml)")
    _pseudo_label_arguments(p)
    p.set_defaults(func=cmd_pseudo_labels)

    p = sub.add_parser("cam-pseudo-labels", help="WSSS baseline: pseudo-labels from a CAM classifier")
    p.add_argument("--model", type=Path, required=True, help="CAM classifier folder (model.pt + config.yaml)")
    _pseudo_label_arguments(p)
    p.add_argument("--min-score", type=float, default=0.0, help="normalised CAM below which a pixel stays 255")
    p.set_defaults(func=cmd_cam_pseudo_labels)

    p = sub.add_parser("retab-pseudo-labels", help="RETAB: CAMs propagated by a boundary-aware random walk")
    p.add_argument("--cam-model", type=Path, required=True, help="CAM classifier folder")
    p.add_argument("--retab-model", type=Path, required=True, help="the split's RETAB network folder")
    _pseudo_label_arguments(p)
    p.add_argument("--beta", type=float, default=8.0, help="affinity power (PSA/RETAB: 8)")
    p.add_argument("--log-t", type=int, default=8, help="the walk runs 2^log_t steps (PSA/RETAB: 8)")
    p.set_defaults(func=cmd_retab_pseudo_labels)

    p = sub.add_parser("evaluate", help="score a COCO-format result file against prepared labels")
    p.add_argument("--predictions", type=Path, required=True, help="COCO stuff-segmentation result JSON")
    p.add_argument("--labels", type=Path, required=True, help="folder of ground-truth label PNGs")
    p.add_argument("--classes", type=Path, required=True, help="class table (YAML)")
    p.add_argument("--split", type=Path, default=None, help="split YAML for base/novel summaries")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON to write")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("figure", help="an appendix figure: test images, ground truth and each method's prediction")
    p.add_argument("--prepared", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--split", type=Path, required=True, help="split YAML (base and novel ids)")
    p.add_argument("--predictions", nargs="+", required=True, help="LABEL=result-file.json, one per method column")
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.set_defaults(func=cmd_figure)

    p = sub.add_parser("table", help="an appendix table (CSV + Markdown with the paper's numbers)")
    p.add_argument("--spec", type=_json_object, required=True, help="rows, columns, name, dataset (JSON)")
    p.add_argument("--metrics-dir", type=Path, required=True, help="results/{dataset}/metrics")
    p.add_argument("--paper", type=Path, required=True, help="the paper's numbers (YAML)")
    p.add_argument("--out-csv", type=Path, required=True)
    p.add_argument("--out-md", type=Path, required=True)
    p.add_argument("--splits-dir", type=Path, default=None, help="add each split's base/novel ratio (Table 3)")
    p.add_argument("--out-plot", type=Path, default=None, help="PNG of novel mIoU against novel ratio")
    p.set_defaults(func=cmd_table)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line, for relaunching it under torchrun
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as err:
        # Bad input: one clear line naming the file or key, not a traceback.
        print(f"error ({args.stage}): {err}", file=sys.stderr)
        return 1
    return 0
