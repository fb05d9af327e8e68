"""The encoder interface shared by text and image encoders, and the ``ENCODERS`` registry.

An :class:`Encoder` turns a list of per-item inputs (texts, image paths) into one or more named
outputs per input, each ``[n, dim]`` float32: ``"final"`` (the model's own embedding) and, when
asked for, ``"layer<i>"`` (hidden layer ``i`` mean-pooled over tokens). Encoders are cheap to
construct: the model is loaded on first use, and :meth:`Encoder.identity` hashes the weight *files*
without loading them, so a store that is already up to date never loads the model.

Encoders are named in feature specs (``encoder: minilm``) and resolved by :data:`ENCODERS`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from appdistill.io import json_digest as io_json_digest
from appdistill.registry import Registry

log = logging.getLogger("appdistill.foundation")

#: name -> encoder factory; ``ENCODERS.build("clip", {"arch": ..., "pretrained": ...})``.
ENCODERS: Registry = Registry("foundation encoder")

Modality = Literal["text", "image"]
#: one encoded batch: ``(positions into the input list [b], {output: [b, dim] float32})``
EncodedBatch = tuple[np.ndarray, dict[str, np.ndarray]]


class EmptyInputWarning(UserWarning):
    """Some inputs were empty text or missing/unreadable images and got zero vectors."""


def force_offline() -> None:
    """Make Hugging Face libraries fail fast instead of trying the network.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once at import, so when it is already imported the
    module constant is set too (``transformers`` asks ``huggingface_hub.is_offline_mode()``).
    ``APPDISTILL_ALLOW_NETWORK=1`` leaves everything as the user configured it.
    """
    if os.environ.get("APPDISTILL_ALLOW_NETWORK") == "1":
        return
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[var] = "1"
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def dir_digest(path: str | Path, skip: Sequence[str] = ("README.md", ".gitattributes")) -> str:
    """sha256 over every file of a model directory (relative names + contents), docs skipped."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip
                    and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(root)).encode())
        h.update(file_digest(f).encode())
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    return io_json_digest(obj)


def hash_strings(values: Sequence[str]) -> np.ndarray:
    """Stable 64-bit content hash per string, ``[n]`` uint64 (the store's per-row input key)."""
    out = np.empty(len(values), dtype=np.uint64)
    for i, v in enumerate(values):
        out[i] = int.from_bytes(hashlib.blake2b(v.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                "little")
    return out


class Encoder(ABC):
    """A frozen foundation encoder over per-item inputs.

    Subclasses set :attr:`name` (the registry key), :attr:`modality`, :attr:`outputs` and
    implement :meth:`identity`, :meth:`input_keys`, :meth:`output_dims` and :meth:`encode_batches`.

    Attributes:
        stats: counters of inputs that got zero vectors (``empty_text``, ``missing_image``,
            ``unreadable_image``), summed over every call.
    """

    name: str = "encoder"
    modality: Modality = "text"

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()

    @property
    @abstractmethod
    def outputs(self) -> list[str]:
        """Names of the outputs produced per input (``"final"`` first)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything that changes the outputs except the weights (JSON-able, no model load)."""

    @abstractmethod
    def weights_digest(self) -> str:
        """Hash of the weights (files), computed without loading the model."""

    def identity(self) -> dict[str, Any]:
        """``{name, config, weights}``: equal identities give equal embeddings for equal inputs."""
        return {"name": self.name, "config": self.config(), "weights": self.weights_digest()}

    @property
    def slug(self) -> str:
        """Directory name of this encoder's stores: name + hash of its config (not its weights)."""
        return f"{self.name}-{json_digest(self.config())[:10]}"

    @abstractmethod
    def input_keys(self, inputs: Sequence[Any]) -> np.ndarray:
        """``[n]`` uint64 content key per input: equal keys mean equal embeddings (same model)."""

    @abstractmethod
    def output_dims(self) -> dict[str, int]:
        """``{output: dim}`` (may load the model)."""

    @abstractmethod
    def encode_batches(self, inputs: Sequence[Any]) -> Iterator[EncodedBatch]:
        """Encode ``inputs``, yielding ``(positions [b], {output: [b, dim] float32})`` per batch.

        Every position is yielded exactly once; empty/missing inputs come as zero rows.
        """

    def encode(self, inputs: Sequence[Any], progress: bool = True) -> dict[str, np.ndarray]:
        """Encode everything in memory: ``{output: [n, dim] float32}`` (rows in input order)."""
        from appdistill.progress import bar

        dims = self.output_dims()
        out = {k: np.zeros((len(inputs), dims[k]), np.float32) for k in self.outputs}
        with bar(total=len(inputs), desc=f"encode ({self.name})", unit="item", enabled=progress) as pbar:
            for pos, vals in self.encode_batches(inputs):
                for k, v in vals.items():
                    out[k][pos] = v
                pbar.update(len(pos))
        return out

    def _warn_zero(self, kind: str, count: int, total: int, examples: Sequence[str] = ()) -> None:
        """Count ``count`` zero-vector inputs of ``kind`` and emit one warning with the count."""
        if count == 0:
            return
        self.stats[kind] += count
        ex = f" (e.g. {', '.join(map(str, list(examples)[:3]))})" if examples else ""
        msg = f"{self.name}: {count} of {total} inputs are {kind.replace('_', ' ')} -> zero vectors{ex}"
        log.warning(msg)
        warnings.warn(msg, EmptyInputWarning, stacklevel=3)
