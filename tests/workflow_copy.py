"""A copy of the workflow in a scratch folder, so test runs never touch the checkout's results/."""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "rules", "config", "envs", "profiles", "report", "workflow"]


def copy_workflow(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source, target / name, dirs_exist_ok=True, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    return target
