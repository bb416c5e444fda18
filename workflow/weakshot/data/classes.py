"""The class table of a dataset: contiguous train ids, names, raw dataset ids and thing/stuff kind.

A class table is a small YAML file::

    dataset: coco_stuff_10k
    ignore_label: 255
    classes:
      - {id: 0, name: person, dataset_id: 1, kind: thing}

``id`` is the contiguous train id stored in prepared label PNGs; ``dataset_id`` is the raw id the source
archive uses (the COCO id for COCO-Stuff v1.1, the PNG value for ADE20K), which result files report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from weakshot.io_utils import read_yaml, write_yaml

IGNORE_LABEL = 255


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    dataset_id: int
    kind: str = "unknown"  # "thing", "stuff" or "unknown"


@dataclass(frozen=True)
class ClassTable:
    dataset: str
    classes: tuple[ClassInfo, ...]
    ignore_label: int = IGNORE_LABEL

    def __post_init__(self) -> None:
        ids = [c.id for c in self.classes]
        if ids != list(range(len(ids))):
            raise ValueError(f"class table of {self.dataset!r}: ids must be 0..{len(ids) - 1} in order")
        if len(ids) >= self.ignore_label:
            raise ValueError(f"class table of {self.dataset!r}: {len(ids)} classes collide with ignore label")
        dataset_ids = [c.dataset_id for c in self.classes]
        if len(set(dataset_ids)) != len(dataset_ids):
            raise ValueError(f"class table of {self.dataset!r}: dataset_id values are not unique")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def dataset_id_to_id(self) -> dict[int, int]:
        return {c.dataset_id: c.id for c in self.classes}

    def id_to_dataset_id(self) -> dict[int, int]:
        return {c.id: c.dataset_id for c in self.classes}

    @classmethod
    def load(cls, path: str | Path) -> ClassTable:
        data = read_yaml(path)
        if not isinstance(data, dict) or "classes" not in data or "dataset" not in data:
            raise ValueError(f"{path}: a class table needs the keys 'dataset' and 'classes'")
        try:
            classes = tuple(
                ClassInfo(
                    id=int(c["id"]),
                    name=str(c["name"]),
                    dataset_id=int(c["dataset_id"]),
                    kind=str(c.get("kind", "unknown")),
                )
                for c in data["classes"]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed class entry ({err!r}); need id, name, dataset_id") from None
        try:
            return cls(str(data["dataset"]), classes, int(data.get("ignore_label", IGNORE_LABEL)))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> None:
        write_yaml(
            path,
            {
                "dataset": self.dataset,
                "ignore_label": self.ignore_label,
                "classes": [
                    {"id": c.id, "name": c.name, "dataset_id": c.dataset_id, "kind": c.kind} for c in self.classes
                ],
            },
        )
