"""The export's file set, manifest format and the ``torch.export`` program both sides build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from appdistill.errors import AppDistillError
from appdistill.export.serving import ServingModel
from appdistill.features import content as content_files
from appdistill.features.content import CONTENT_DIR
from appdistill.features.spec import FeatureSpec

FILES = ("model.pt2", "weights.pt", "student.json", "features.json", "processor.json")
REQUIRED = ("weights.pt", "student.json", "features.json", "processor.json")
MANIFEST = "manifest.json"
FORMAT = "appdistill-export/1"
STUDENT_PREFIXES = ("ebc.", "dense_arch.", "interaction.", "over_arch.", "content_proj.")
CONTENT_FILES = tuple(f"{CONTENT_DIR}/{f}" for f in content_files.FILES)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AppDistillError(f"file '{path}': {what} is unreadable or not valid JSON ({e})") from e


def export_program(serving: ServingModel, feats: list[FeatureSpec], example: tuple[torch.Tensor, ...]) -> Any:
    """``torch.export`` of the serving model with dynamic batch and id-list sizes (an ``ExportedProgram``).

    The same call builds the program that ``model.pt2`` holds (at export) and the one :class:`Ranker`
    runs (at load, from ``weights.pt``): equal weights and graph give bit-identical scores.
    """
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 24)
    dyn: list[dict[int, Any]] = []
    for f in (f for f in feats if f.kind in ("sparse_id", "id_list")):
        dyn += [{0: batch} if f.kind == "sparse_id" else {0: Dim(f"nnz_{f.name}", min=1, max=1 << 30)}, {0: batch}]
    dyn.append({0: batch})
    return torch.export.export(serving, example, dynamic_shapes=(tuple(dyn),), strict=False)


