"""Image (and image-text) encoder over ``open_clip``.

The model comes from ``open_clip.create_model_and_transforms(arch, pretrained=...)`` where
``pretrained`` is

- a local checkpoint file (``.pt``/``.bin``/``.safetensors``; what users pass on machines without
  network) - a missing file is an :class:`~appdistill.errors.AppDistillError` naming the path;
- a pretrained tag (``laion2b_s34b_b79k``): works only when its weights are already in the local
  cache, because the Hugging Face hub is forced offline; otherwise a clear error says so;
- ``"random"``: seeded random weights (tests, timing runs; never for real features).

``arch`` is a built-in open_clip name (``ViT-B-32``) or the path of a JSON model config (the same
format as ``open_clip/model_configs/*.json``), registered with ``open_clip.add_model_config``.

``modality="image"`` encodes image paths (relative ones resolved against ``root``); a missing or
unreadable image is a zero vector plus a counted warning. ``modality="text"`` encodes texts with
the CLIP text tower (same embedding space as the images).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from appdistill.errors import AppDistillError
from appdistill.foundation.base import (ENCODERS, EncodedBatch, Encoder, file_digest, force_offline,
                                        hash_strings, json_digest)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def _open_clip() -> Any:
    force_offline()  # before open_clip imports huggingface_hub
    import open_clip

    return open_clip


def resolve_arch(arch: str) -> str:
    """Register a JSON config path with open_clip (returns its stem) or check a built-in name."""
    oc = _open_clip()
    p = Path(arch).expanduser()
    if p.suffix == ".json":
        if not p.is_file():
            raise AppDistillError(f"open_clip model config file '{p}' not found")
        oc.add_model_config(p)
        return p.stem
    if oc.get_model_config(arch) is None:
        raise AppDistillError(f"unknown open_clip architecture '{arch}'; pass a built-in name "
                              f"(e.g. ViT-B-32) or the path of a JSON model config")
    return arch


def resolve_pretrained(arch: str, pretrained: str | None) -> tuple[Literal["file", "tag", "random"], str]:
    """Classify ``pretrained`` as an existing checkpoint file, a known tag of ``arch``, or random."""
    if pretrained in (None, "", "random"):
        return "random", "random"
    oc = _open_clip()
    p = Path(pretrained).expanduser()
    if p.is_file():
        return "file", str(p.resolve())
    if oc.get_pretrained_cfg(arch, pretrained):
        return "tag", pretrained
    if os.sep in pretrained or p.suffix in CHECKPOINT_SUFFIXES or p.exists():
        raise AppDistillError(f"CLIP checkpoint file '{p}' not found (pretrained for arch '{arch}')")
    tags = oc.list_pretrained_tags_by_model(arch)
    raise AppDistillError(f"pretrained '{pretrained}' is neither a checkpoint file nor a tag of '{arch}' "
                          f"(tags: {', '.join(tags) or 'none'})")


class ClipEncoder(Encoder):
    """A frozen open_clip model encoding image paths (or texts with its text tower).

    Args:
        arch: open_clip architecture name or JSON config path.
        pretrained: checkpoint file, pretrained tag, or ``"random"`` (see module docstring).
        modality: ``"image"`` (inputs are image paths) or ``"text"`` (inputs are texts).
        root: directory that relative image paths are resolved against.
        batch_size: images/texts per forward pass.
        normalize: L2-normalise embeddings (CLIP's similarity space).
        seed: torch seed for ``pretrained="random"``.
        device: ``"cpu"``/``"cuda"``; default: cuda when available.
        workers: threads decoding images while the model runs.
        name: registry name recorded in the store identity.
    """

    def __init__(self, arch: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k",
                 modality: Literal["image", "text"] = "image", root: str | None = None, batch_size: int = 32,
                 normalize: bool = True, seed: int = 0, device: str | None = None, workers: int = 2,
                 name: str = "clip") -> None:
        super().__init__()
        if modality not in ("image", "text"):
            raise AppDistillError(f"encoder '{name}': modality must be 'image' or 'text', got {modality!r}")
        self.name, self.modality, self.batch_size = name, modality, batch_size
        self.arch_arg = arch
        self.arch = resolve_arch(arch)
        self.pretrained_kind, self.pretrained = resolve_pretrained(self.arch, pretrained)
        self.root = Path(root).expanduser() if root else None
        self.normalize, self.seed, self.device, self.workers = normalize, seed, device, workers
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None

    # ----------------------------------------------------------------- identity
    @property
    def outputs(self) -> list[str]:
        return ["final"]

    def config(self) -> dict[str, Any]:
        arch_cfg = _open_clip().get_model_config(self.arch)
        return {"arch": self.arch, "arch_config": json_digest(arch_cfg)[:16], "modality": self.modality,
                "pretrained_kind": self.pretrained_kind, "normalize": self.normalize,
                "seed": self.seed if self.pretrained_kind == "random" else None}

    def weights_digest(self) -> str:
        if self.pretrained_kind == "file":
            return file_digest(self.pretrained)
        return f"{self.pretrained_kind}:{self.pretrained}"

    def resolve_path(self, value: Any) -> Path | None:
        """Image path of one input (relative -> under ``root``); ``None`` for empty cells."""
        if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
            return None
        p = Path(str(value).strip()).expanduser()
        return p if p.is_absolute() or self.root is None else self.root / p

    def input_keys(self, inputs: Sequence[Any]) -> np.ndarray:
        if self.modality == "text":
            return hash_strings(["" if v is None else str(v).strip() for v in inputs])
        keys = []
        for v in inputs:  # path + mtime + size: a replaced image file is a changed input
            p = self.resolve_path(v)
            try:
                st = p.stat() if p is not None else None
                keys.append(f"{p}|{st.st_mtime_ns}|{st.st_size}" if st else "|missing")
            except OSError:
                keys.append(f"{p}|missing")
        return hash_strings(keys)

    # ----------------------------------------------------------------- model
    @property
    def model(self) -> Any:
        if self._model is None:
            oc = _open_clip()
            import torch

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            pretrained = None if self.pretrained_kind == "random" else self.pretrained
            if self.pretrained_kind == "tag":
                self._check_tag_cached(oc)
            if self.pretrained_kind == "random":
                torch.manual_seed(self.seed)
            try:
                model, _, preprocess = oc.create_model_and_transforms(self.arch, pretrained=pretrained, device=device)
            except Exception as e:  # noqa: BLE001 - re-raised as an actionable error
                if self.pretrained_kind == "tag":
                    raise AppDistillError(self._tag_message(str(e))) from None
                raise AppDistillError(f"cannot load open_clip '{self.arch}' with pretrained='{self.pretrained}': "
                                      f"{e}") from e
            model.eval()
            self._model, self._preprocess = model, preprocess
            if self.modality == "text":
                self._tokenizer = oc.get_tokenizer(self.arch)
        return self._model

    def _tag_message(self, detail: str) -> str:
        first = detail.split(". ")[0][:160]
        return (f"open_clip pretrained tag '{self.pretrained}' of '{self.arch}' needs network access to download "
                f"its weights, and appdistill runs the hub offline; download the checkpoint on a machine with "
                f"network and pass the local file as `pretrained: /path/to/checkpoint.bin` ({first})")

    def _check_tag_cached(self, oc: Any) -> None:
        """A url-only tag would be fetched with urllib (not covered by HF offline): refuse early."""
        cfg = oc.get_pretrained_cfg(self.arch, self.pretrained)
        if cfg.get("hf_hub") or cfg.get("file") or not cfg.get("url"):
            return
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if not cached.is_file():
            raise AppDistillError(self._tag_message(f"not in {cached.parent}"))

    def output_dims(self) -> dict[str, int]:
        cfg = _open_clip().get_model_config(self.arch)
        return {"final": int(cfg["embed_dim"])}

    # ----------------------------------------------------------------- encoding
    def _load_image(self, value: Any) -> tuple[Any, str | None]:
        """``(tensor [3, H, W] | None, problem)`` for one input."""
        from PIL import Image

        p = self.resolve_path(value)
        if p is None or not p.is_file():
            return None, "missing_image"
        try:
            with Image.open(p) as im:
                return self._preprocess(im.convert("RGB")), None
        except Exception:  # noqa: BLE001 - any decode failure is an unreadable image
            return None, "unreadable_image"

    def encode_batches(self, inputs: Sequence[Any]) -> Iterator[EncodedBatch]:
        """Yield ``(positions [b], {"final": [b, embed_dim]})``; bad inputs are zero rows."""
        import torch

        model, n = self.model, len(inputs)
        dim = self.output_dims()["final"]
        dev = next(model.parameters()).device
        problems: dict[str, list[int]] = {"missing_image": [], "unreadable_image": [], "empty_text": []}
        pool = ThreadPoolExecutor(max(1, self.workers)) if self.modality == "image" else None
        try:
            with torch.inference_mode():
                for s in range(0, n, self.batch_size):
                    pos = np.arange(s, min(n, s + self.batch_size))
                    out = np.zeros((len(pos), dim), np.float32)
                    if self.modality == "image":
                        loaded = list(pool.map(self._load_image, [inputs[i] for i in pos]))  # type: ignore[union-attr]
                        ok = [j for j, (t, _) in enumerate(loaded) if t is not None]
                        for j, (_, why) in enumerate(loaded):
                            if why:
                                problems[why].append(int(pos[j]))
                        if ok:
                            x = torch.stack([loaded[j][0] for j in ok]).to(dev)
                            out[ok] = model.encode_image(x, normalize=self.normalize).float().cpu().numpy()
                    else:
                        texts = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip()
                                 for v in (inputs[i] for i in pos)]
                        ok = [j for j, t in enumerate(texts) if t]
                        problems["empty_text"] += [int(pos[j]) for j, t in enumerate(texts) if not t]
                        if ok:
                            tok = self._tokenizer([texts[j] for j in ok]).to(dev)
                            out[ok] = model.encode_text(tok, normalize=self.normalize).float().cpu().numpy()
                    yield pos, {"final": out}
        finally:
            if pool is not None:
                pool.shutdown()
        for kind, rows in problems.items():
            examples = [f"position {i}" if kind == "empty_text" else str(inputs[i]) for i in rows[:3]]
            self._warn_zero(kind, len(rows), n, examples)


@ENCODERS.register("clip")
def clip(arch: str = "ViT-B-32", pretrained: str | None = "laion2b_s34b_b79k", **kwargs: Any) -> ClipEncoder:
    """Registry entry ``clip``: open_clip image encoder (``modality="text"`` for its text tower)."""
    return ClipEncoder(arch=arch, pretrained=pretrained, **kwargs)
