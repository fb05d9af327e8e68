"""Scoring raw rows with an export: :class:`Ranker` (what ``appdistill score`` runs).

Loading runs no code: see :mod:`appdistill.export.artifact`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from appdistill.errors import AppDistillError
from appdistill.export.archive import check_pt2_archive, check_weights_file
from appdistill.export.format import CONTENT_FILES, FORMAT, MANIFEST, REQUIRED, export_program, read_json
from appdistill.export.serving import ServingModel
from appdistill.features.content import CONTENT_DIR, ContentTable
from appdistill.features.processor import FeatureProcessor
from appdistill.features.row_encoder import RowEncoder
from appdistill.features.spec import FeatureSpec
from appdistill.io import digest_problem
from appdistill.student.model import RankingModel, StudentConfig

# ---------------------------------------------------------------------------------------- serving
class Ranker:
    """Scores raw request rows with an exported student.

    Args:
        path: export directory (every file's sha256 is checked against ``manifest.json`` on load).
        compiled: run the student compiled with ``torch.export`` (default; rebuilt from ``weights.pt``,
            ``model.pt2`` is inspected but never loaded: module doc) or the eager model.

    Raises:
        AppDistillError: a missing, edited or corrupt file in the export directory (named);
            :class:`UnsafeArchiveError` for a ``model.pt2`` that would run code if loaded.
    """

    def __init__(self, path: str | Path, compiled: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise AppDistillError(f"export directory '{self.path}' not found")
        man_path = self.path / MANIFEST
        if not man_path.is_file():
            raise AppDistillError(f"export directory '{self.path}': missing file '{MANIFEST}' "
                                  "(not an `appdistill export` directory?)")
        self.manifest = read_json(man_path, "the export manifest")
        files = self.manifest.get("files") if isinstance(self.manifest, dict) else None
        if not isinstance(files, dict) or self.manifest.get("format") != FORMAT:
            raise AppDistillError(f"file '{man_path}': not an {FORMAT} manifest (edited or from another version)")
        unlisted = [f for f in REQUIRED if f not in files]
        if unlisted:
            raise AppDistillError(f"file '{man_path}': lists no checksum for {unlisted} (manifest edited or corrupt)")
        problem = digest_problem(self.path, files)
        if problem:
            raise AppDistillError(f"export directory '{self.path}': {problem}; re-run `appdistill export`")
        try:
            self.features = [FeatureSpec.model_validate(d) for d in read_json(self.path / "features.json", "features")]
            self.processor = FeatureProcessor.from_json((self.path / "processor.json").read_text())
            cfg = StudentConfig(**read_json(self.path / "student.json", "the student config"))
            model = RankingModel.from_spec(self.features, self.processor, cfg)
            check_weights_file(self.path / "weights.pt")  # only tensors, before even the weights-only unpickler
            model.load_state_dict(torch.load(self.path / "weights.pt", map_location="cpu", weights_only=True))
        except AppDistillError:
            raise
        except Exception as e:  # noqa: BLE001 - checksums matched, so the export itself is inconsistent
            raise AppDistillError(f"export directory '{self.path}': cannot load the student "
                                  f"({type(e).__name__}: {e})") from e
        unlisted = [f for f in CONTENT_FILES if f not in files] if cfg.content_dim else []
        if unlisted:  # never read a file the manifest does not vouch for
            raise AppDistillError(f"file '{man_path}': lists no checksum for {unlisted} (manifest edited or corrupt)")
        self.content = ContentTable.load(self.path / CONTENT_DIR) if cfg.content_dim else None
        if self.content is not None and self.content.dim != cfg.content_dim:
            raise AppDistillError(f"export directory '{self.path}': the content table has {self.content.dim} columns, "
                                  f"the student reads {cfg.content_dim}")
        self.encoder = RowEncoder(self.features, self.processor, self.content)
        self.eager = ServingModel(model.eval()).eval()
        self.program = None
        if files.get("model.pt2"):  # a tampered archive is refused, not served (nor passed on), compiled or not
            check_pt2_archive(self.path / "model.pt2")
        if compiled and files.get("model.pt2"):
            # never torch.export.load: it can unpickle and evaluate what the archive holds (module doc).
            # The program is rebuilt from the weights-only state dict instead: the graph and weights of
            # model.pt2, so the same scores.
            try:
                with torch.no_grad():
                    self.program = export_program(self.eager, self.features, self.encoder.example()).module()
            except Exception as e:  # noqa: BLE001
                raise AppDistillError(f"export directory '{self.path}': cannot compile the student with torch.export "
                                      f"({type(e).__name__}: {e}); load it with compiled=False") from e

    @classmethod
    def load(cls, path: str | Path, compiled: bool = True) -> Ranker:
        return cls(path, compiled)

    @property
    def columns(self) -> list[str]:
        """The input columns the student needs (others are ignored)."""
        return self.encoder.columns

    def inputs(self, df: pd.DataFrame, source: str = "input") -> tuple[torch.Tensor, ...]:
        """The model inputs of ``df`` (what :meth:`forward` takes)."""
        return self.encoder.encode(df, source)

    @torch.inference_mode()
    def forward(self, x: tuple[torch.Tensor, ...]) -> np.ndarray:
        """Logits ``[N]`` of already encoded inputs (:meth:`inputs`)."""
        # the compiled program was traced with non-empty id lists; an all-empty list feature goes eager
        fn = self.program if self.program is not None and all(v.numel() > 0 for v in x[:-1:2]) else self.eager
        return fn(*x).numpy()

    def logits(self, df: pd.DataFrame, source: str = "input") -> np.ndarray:
        """Raw student logits ``[N]`` for rows of raw feature values."""
        x = self.inputs(df, source)
        if len(df) == 0:
            return np.zeros(0, np.float32)
        return self.forward(x)

    def score(self, df: pd.DataFrame, source: str = "input") -> np.ndarray:
        """Probabilities ``[N]`` float64 (sigmoid of the logits, in float64 so no two scores tie that
        the logits order).

        ``df`` is a pandas DataFrame, one row per candidate, holding :attr:`columns` once each (other
        columns are ignored). Accepted values:

        - ``sparse_id``: integers, integral floats (``50.0``) and strings (``"50"``); unseen -> OOV;
          NaN/None -> OOV for side-table features and ``missing: oov`` features, else an error.
        - ``id_list``: with a separator, strings such as ``"a|b"`` (a single number is one id); without,
          lists/tuples/arrays of ids; NaN/None/empty -> an empty list.
        - ``dense``: ints, floats, booleans (0/1) and numeric strings; NaN/None -> the training mean.

        Refused, with an :class:`~appdistill.errors.AppDistillError` naming ``source``, the feature,
        the column and the first bad row: booleans, ``inf``, fractional floats, dates/times, complex
        numbers, bytes, lists/dicts/sets as ids; dates/times, complex numbers, containers, non-numeric
        strings, ``inf`` and values beyond float32 (``|x| > 3.4e38``) as dense values; a needed column
        that is missing or appears twice.
        """
        from scipy.special import expit

        return expit(self.logits(df, source).astype(np.float64))
