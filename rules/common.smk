# Helpers shared by the .smk files: config look-ups and target lists (functions only, no rules).
import json
import os
import shlex
from pathlib import Path

# Jobs run `python -m weakshot`; putting the package on PYTHONPATH makes that work in any environment a
# job runs in (the project venv, a --sdm conda env, a cluster node) without an install step. This sets
# the variable for the jobs; the workflow requires no variable from the user, so no `envvars:`.
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        filter(
            None,
            [str(Path(workflow.basedir) / "workflow"), os.environ.get("PYTHONPATH")],
        )
    )
)

if config["dataset"] not in config["datasets"]:
    raise ValueError(
        f"config: 'dataset' is {config['dataset']!r}, which is not a key of 'datasets' "
        f"({', '.join(config['datasets'])})"
    )


def datasets_with_source(source):
    return [name for name, d in config["datasets"].items() if d["source"] == source]


def one_of(names):
    """A wildcard regex matching exactly the given names (and nothing when the list is empty)."""
    return "|".join(names) if names else "(?!)"


EMBEDDED_DATASETS = datasets_with_source("embedded")
DOWNLOADED_DATASETS = datasets_with_source("download")


def dataset_config(wildcards):
    return config["datasets"][wildcards.dataset]


def class_table(wildcards):
    """The class table a dataset is converted with: the generator's, or the one named in config."""
    if dataset_config(wildcards)["source"] == "embedded":
        return f"resources/{wildcards.dataset}/classes.yaml"
    return dataset_config(wildcards)["classes"]


def generator_spec(wildcards):
    return json.dumps(dataset_config(wildcards)["generator"])


def checksum_flags(spec):
    """Command-line flags for the size and checksums a download is verified against."""
    flags = [
        f"--{key} {spec[key]}" for key in ("size", "sha256", "md5") if spec.get(key)
    ]
    return " ".join(flags)


def download_checks(wildcards):
    return checksum_flags(dataset_config(wildcards))


def exclude_train_flag(wildcards):
    names = dataset_config(wildcards).get("exclude_train", [])
    return "--exclude-train " + " ".join(names) if names else ""


def split_spec(wildcards):
    return json.dumps(dataset_config(wildcards)["splits"])


def split_reference(wildcards):
    """The paper's split list, when a dataset uses it (a rerun trigger if it changes)."""
    return dataset_config(wildcards)["splits"].get("reference", [])


def split_names(dataset):
    """Names of the splits a dataset defines (no file I/O beyond the small reference YAML)."""
    spec = config["datasets"][dataset]["splits"]
    if spec["source"] == "random":
        count = spec["num_random"] + len(spec["extra_novel_ratios"])
        return [f"split{i}" for i in range(1, count + 1)]
    import yaml

    with open(spec["reference"]) as f:
        return list(yaml.safe_load(f)[spec["reference_key"]]["split_names"])


def split_targets(dataset):
    return expand(
        [
            "results/{dataset}/splits/{split}.yaml",
            "results/{dataset}/splits/{split}_image_labels.tsv",
        ],
        dataset=dataset,
        split=split_names(dataset),
    )


def report_inputs():
    return table_targets() + figure_targets()


def all_targets():
    return split_targets(config["dataset"]) + report_inputs() + ["results/report.html"]


# --- training, evaluation and tables -------------------------------------------------------------------


def deep_merge(base, override):
    """`override` laid over `base`, recursing into mappings (as weakshot.config.deep_merge)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def method_config(method, dataset=None):
    """A model's settings: `training`, then the dataset's `training` (its crop size, schedule and loss
    weights), then the method's overrides, then the dataset's overrides of that method (e.g. one
    method's schedule on one dataset). Without a dataset: what all datasets share."""
    if method not in config["methods"]:
        raise ValueError(
            f"config: no method {method!r} under 'methods' ({', '.join(config['methods'])})"
        )
    spec = config["datasets"][dataset] if dataset is not None else {}
    layers = [
        config["training"],
        spec.get("training", {}),
        config["methods"][method],
        spec.get("methods", {}).get(method, {}),
    ]
    merged = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    return merged


def split_independent(method):
    """Models trained once per dataset: the oracle (every class with masks) and the CAM classifier (image
    labels of every class); every other model depends on a split's base/novel partition.
    """
    settings = method_config(method).get("method", {})
    supervision = settings.get("supervision", "weak")
    return supervision == "image" or (
        supervision == "full" and not settings.get("pseudo_labels")
    )


def check_seed_settings():
    """`seeds` sets the training seed of every model (one replicate per seed); a `train.seed` in a settings
    layer would be overridden without a word, so it is an error."""
    layers = {"training": config["training"]}
    layers.update({f"methods.{m}": v for m, v in config["methods"].items()})
    for name, spec in config["datasets"].items():
        layers[f"datasets.{name}.training"] = spec.get("training", {})
        for m, v in spec.get("methods", {}).items():
            layers[f"datasets.{name}.methods.{m}"] = v
    for where, layer in layers.items():
        if "seed" in (layer or {}).get("train", {}):
            raise ValueError(
                f"config: {where}.train.seed is set; the training seeds are the top-level `seeds` "
                "list (one replicate of every model per seed)"
            )


check_seed_settings()


def normalised_seeds(seeds, where):
    """`seeds` as distinct ints (the schema also admits the digit strings of `--config seeds=[0,1]`)."""
    values = [int(seed) for seed in seeds]
    if len(set(values)) != len(values):
        raise ValueError(f"config: {where} repeats a seed: {seeds}")
    return values


config["seeds"] = normalised_seeds(config["seeds"], "seeds")
for table_name, table in config["tables"].items():
    if "seeds" in table:
        table["seeds"] = normalised_seeds(table["seeds"], f"tables.{table_name}.seeds")

DATASET_METHODS = [name for name in config["methods"] if split_independent(name)]
SPLIT_METHODS = [name for name in config["methods"] if not split_independent(name)]


def seeded_settings(wildcards):
    """A model's settings with the training seed of its `seed` wildcard (one replicate of `seeds`)."""
    settings = method_config(wildcards.method, wildcards.dataset)
    settings["train"] = {**settings.get("train", {}), "seed": int(wildcards.seed)}
    return settings


def run_config(wildcards):
    """The resolved run config of a model, as JSON for the train CLI (a params change reruns training)."""
    return json.dumps(seeded_settings(wildcards))


def config_seeds(spec=None):
    """The training seeds a table (its own `seeds`, else the top-level list) is averaged over."""
    return list((spec or {}).get("seeds", config["seeds"]))


def pretrained_weights(settings):
    """The ImageNet weights file a model starts from, as an input, when the DAG fetches it (a path under
    resources/pretrained/); a path the user provides elsewhere is read as it is."""
    path = settings.get("model", {}).get("backbone", {}).get("weights")
    if path and path.startswith("resources/pretrained/"):
        return {"weights": path}
    return {}


def dataset_model_inputs(wildcards):
    return pretrained_weights(method_config(wildcards.method, wildcards.dataset))


def train_inputs(wildcards):
    """Inputs of a per-split model: the split, its image labels, and the base model to start from."""
    inputs = {
        "split": f"results/{wildcards.dataset}/splits/{wildcards.split}.yaml",
        "image_labels": f"results/{wildcards.dataset}/splits/{wildcards.split}_image_labels.tsv",
    }
    settings = method_config(wildcards.method, wildcards.dataset)
    inputs.update(pretrained_weights(settings))
    method = settings.get("method", {})
    # A replicate starts from, and retrains on the pseudo-labels of, the replicate of the same seed.
    results, replicate = (
        f"results/{wildcards.dataset}",
        f"{wildcards.split}/seed{wildcards.seed}",
    )
    if method.get("init") == "base_model":
        inputs["init"] = f"{results}/models/base_model/{replicate}/model.pt"
    if method.get("pseudo_labels"):
        source = method["pseudo_labels"]
        inputs["pseudo_labels"] = f"{results}/pseudo_labels/{source}/{replicate}"
    return inputs


def split_args(wildcards, input):
    """Train CLI flags of a per-split model: its split, image labels, initial model, pseudo-labels."""
    flags = [f"--split {input.split} --image-labels {input.image_labels}"]
    if "init" in input.keys():
        flags.append(f"--init {input.init}")
    if "pseudo_labels" in input.keys():
        flags.append(f"--pseudo-labels {input.pseudo_labels}")
    return " ".join(flags)


def predictions_of(wildcards):
    """Per-dataset models (the oracle) are predicted once; every other model once per split."""
    prefix = f"results/{wildcards.dataset}/predictions/{wildcards.method}"
    if wildcards.method in DATASET_METHODS:
        return f"{prefix}/seed{wildcards.seed}.json"
    return f"{prefix}/{wildcards.split}/seed{wildcards.seed}.json"


def table_spec(wildcards):
    spec = config["tables"][wildcards.table]
    return json.dumps(
        {
            "name": wildcards.table,
            "dataset": config["dataset"],
            **spec,
            "seeds": config_seeds(spec),
        }
    )


def table_metrics(wildcards):
    spec = config["tables"][wildcards.table]
    return expand(
        "results/{dataset}/metrics/{method}/{split}/seed{seed}.json",
        dataset=config["dataset"],
        method=sorted(
            set(spec["rows"].values()) | set(spec.get("reference", {}).values())
        ),
        split=spec["columns"],
        seed=config_seeds(spec),
    )


def figure_dataset(wildcards):
    """The dataset a figure shows: its own `dataset` key (the paper's Figure 2 is on ADE20K), else the
    tables' dataset."""
    return config["figures"][wildcards.figure].get("dataset", config["dataset"])


def figure_inputs(wildcards):
    spec = config["figures"][wildcards.figure]
    dataset = figure_dataset(wildcards)
    seed = config_seeds()[0]  # a figure shows one replicate: the first seed
    inputs = {
        label: f"results/{dataset}/predictions/{method}/{spec['split']}/seed{seed}.json"
        for label, method in spec["methods"].items()
    }
    inputs["prepared"] = f"results/{dataset}/prepared"
    inputs["split"] = f"results/{dataset}/splits/{spec['split']}.yaml"
    return inputs


def figure_flags(wildcards, input):
    spec = config["figures"][wildcards.figure]
    pairs = " ".join(
        f"{shlex.quote(label)}={input[label]}" for label in spec["methods"]
    )
    title = f"{spec['caption']} ({figure_dataset(wildcards)}, {spec['split']})"
    return f"--predictions {pairs} --rows {spec.get('rows', 6)} --title {shlex.quote(title)}"


def figure_targets():
    return expand("results/{figure}.png", figure=list(config.get("figures", {})))


def table_targets():
    return expand(
        "results/{table}.{ext}", table=list(config["tables"]), ext=["csv", "md"]
    )
