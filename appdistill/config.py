"""Experiment configs: one YAML file = one experiment.

Configs are data: ``yaml.safe_load`` + pydantic with ``extra="forbid"`` (a typo is an error).
Code is named only through ``{key, kwargs}`` blocks resolved by registries; plugin modules are
imported only when listed under ``plugins:``. ``--set a.b=c`` overrides any value (the value is
parsed as YAML, so ``--set train.epochs=2`` gives an int).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appdistill.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Block(_Strict):
    """A registry reference: ``{key: name, kwargs: {...}}``."""

    key: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


# every number a config holds has a type and a range, checked when the config loads (before any
# data is read): a layer width of -4 or a NaN learning rate is a located error, not a traceback
Width = Annotated[int, Field(ge=1, le=1 << 16)]
Rate = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]


class ContentSection(_Strict):
    """The student's content table (:mod:`appdistill.features.content`): per-item vectors projected from
    the foundation store's encodings of text/image features, looked up by item key. Off by default.

    Example::

        student: {content: {enabled: true, features: [title], dim: 16}}
    """

    enabled: bool = False
    #: text/image features on one keyed side table (default: every text/image feature of the item table)
    features: list[str] = Field(default_factory=list)
    #: principal directions kept per feature
    dim: int = Field(default=16, ge=1, le=256)


class StudentSection(_Strict):
    embedding_dim: int | None = Field(default=None, ge=1, le=4096)
    dense_arch: list[Width] = Field(default_factory=lambda: [16])
    interaction: Block = Field(default_factory=lambda: Block(key="dcn", kwargs={"num_layers": 2, "low_rank": 32}))
    over_arch: list[Width] = Field(default_factory=lambda: [64, 32])
    dropout: float = Field(default=0.0, ge=0, lt=1)
    content: ContentSection = Field(default_factory=ContentSection)


class TrainSection(_Strict):
    epochs: int = Field(default=4, ge=1, le=100_000)
    batch_size: int = Field(default=1024, ge=1, le=1 << 24)
    lr: Rate = 1e-3
    embedding_lr: Rate = 0.05
    weight_decay: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    eval_batch_size: int = Field(default=8192, ge=1, le=1 << 24)
    # batches built ahead on a loader thread; None = auto (see train.loop.train_loader)
    prefetch: int | None = Field(default=None, ge=0, le=64)
    num_threads: int | None = Field(default=None, ge=1, le=1024)
    checkpoint_every: int = Field(default=0, ge=0)
    select_best: bool = True
    #: torchrun only: "table_wise" | "row_wise" | "column_wise" | "auto" (planner decides)
    sharding: Literal["table_wise", "row_wise", "column_wise", "auto"] = "table_wise"
    log_every: int = Field(default=50, ge=1)
    #: training order: "rows" (a full permutation each epoch), "blocks" (random windows of blocks of
    #: consecutive rows, shuffled within a window: bounded memory on memory-mapped columns), "auto"
    #: (blocks for interactions streamed from a folder of parquet files, else rows)
    shuffle: Literal["auto", "rows", "blocks"] = "auto"

    def block_shuffle(self, streamed: bool) -> bool:
        """Whether training walks blocks (``shuffle``, with ``auto`` resolved for a streamed data set or
        not): the loader's order and the resume identity both ask here."""
        return self.shuffle == "blocks" or (self.shuffle == "auto" and streamed)


class TransferSection(_Strict):
    """A transfer set (:mod:`appdistill.features.transfer`): unlabelled rows the teachers label, mixed
    into training with the method's teacher terms only. Off by default; ignored by ``method: none``.

    Example::

        transfer: {enabled: true, ratio: 1.0}
    """

    enabled: bool = False
    #: transfer rows per training row (the epoch grows by this factor)
    ratio: float = Field(default=1.0, gt=0, le=20)
    #: auto = pairs for interaction data, perturb for a one-row-per-entity table
    strategy: Literal["auto", "pairs", "perturb"] = "auto"
    seed: int = 0


class EvalSection(_Strict):
    k: int = Field(default=10, ge=1, le=10_000)


class TrackingSection(_Strict):
    """Optional MLflow experiment tracking (``appdistill.train.tracking``); off by default.

    Example::

        tracking: {enabled: true, uri: ./mlruns, experiment: ml100k}
    """

    enabled: bool = False
    #: MLflow tracking URI; a plain path is a local file store relative to the cwd (default ./mlruns)
    uri: str | None = None
    #: MLflow experiment name (default: the config's ``name``)
    experiment: str | None = None


class ExperimentConfig(_Strict):
    """A whole experiment.

    Example (``configs/ml100k_plain.yaml``)::

        name: ml100k-plain
        spec: feature_specs/ml100k.yaml
        student: {interaction: {key: dcn}}
        method: {key: none}
        train: {epochs: 4, batch_size: 1024}
    """

    name: str = "experiment"
    spec: str
    seed: int = 0
    plugins: list[str] = Field(default_factory=list)
    split: dict[str, Any] | None = None
    student: StudentSection = Field(default_factory=StudentSection)
    method: Block = Field(default_factory=lambda: Block(key="none"))
    teachers: dict[str, Block] = Field(default_factory=dict)
    #: where fitted teachers and their caches live (default: the run directory)
    teachers_dir: str | None = None
    train: TrainSection = Field(default_factory=TrainSection)
    transfer: TransferSection = Field(default_factory=TransferSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    #: directory of the config file (relative paths resolve against it, then the cwd, then the repo)
    base_dir: str = "."

    def resolve_path(self, p: str) -> Path:
        path = Path(p)
        if path.is_absolute():
            return path
        for root in (Path(self.base_dir), Path.cwd(), REPO_ROOT):
            if (root / path).exists():
                return (root / path).resolve()
        return (Path(self.base_dir) / path).resolve()

    def load_spec(self):  # noqa: ANN201 - avoids an import cycle in the signature
        from appdistill.features.spec import FeatureSpecSet

        spec = FeatureSpecSet.from_yaml(self.resolve_path(self.spec))
        if self.split is not None:
            raw = spec.model_dump()
            raw["split"] = {**raw["split"], **self.split}
            spec = FeatureSpecSet.from_dict(raw, source=self.spec, base_dir=spec.base_dir)
        return spec

    def teachers_path(self, run_dir: str | Path) -> Path:
        """Where fitted teachers and their caches live: ``teachers_dir`` or the run directory."""
        return self.resolve_path(self.teachers_dir) if self.teachers_dir else Path(run_dir)

    def stable_dump(self) -> dict[str, Any]:
        """``model_dump()`` without settings added later that sit at their defaults, so the hashes that
        key earlier runs (bench run directories, resume identities) stay what they were."""
        raw = self.model_dump(exclude={"base_dir"})
        if raw["student"].get("content") == ContentSection().model_dump():
            del raw["student"]["content"]
        return raw

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude={"base_dir"}), sort_keys=False)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a raw config dict (values parsed with ``yaml.safe_load``).

    ``teachers.NAME=null`` removes that teacher from the committee (e.g. the foundation teacher on
    text-free data). ``method.key=OTHER`` starts from OTHER's defaults: the previous method's kwargs
    would be unknown to it (``method.kwargs...`` overrides after it apply as usual)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set '{ov}': expected key.path=value")
        key, val = ov.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"--set '{ov}': empty key in '{key}'; expected key.path=value (e.g. train.epochs=2)")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set '{ov}': '{p}' is not a section")
            node = nxt
        from appdistill.features.spec import load_yaml  # bounded safe_load, errors name the override

        try:
            value = load_yaml(val, "--set", ConfigError)
        except ConfigError as e:  # "file '--set': not valid YAML: ..." -> name the override instead
            raise ConfigError(f"--set '{ov}': the value {str(e).split(': ', 1)[-1]}") from None
        if parts == ["method", "key"] and node.get("key") != value:
            node["kwargs"] = {}
        if value is None and len(parts) == 2 and parts[0] == "teachers":
            node.pop(parts[-1], None)  # `--set teachers.foundation=null` drops that committee member
        else:
            node[parts[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate a config; import its explicit plugins."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"file '{path}': config not found")
    from appdistill.features.spec import load_yaml  # bounded safe_load: alias bombs are refused

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"file '{path}': cannot be read as text ({type(e).__name__}: {e})") from None
    try:
        raw = load_yaml(text, str(path), ConfigError) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"file '{path}': not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"file '{path}': a config must be a mapping")
    raw = apply_overrides(raw, overrides or [])
    raw.setdefault("base_dir", str(path.parent.resolve()))
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  - {where}: {msg}")
        raise ConfigError(f"file '{source}': invalid config:\n" + "\n".join(lines)) from None
    for mod in cfg.plugins:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ConfigError(f"file '{source}': plugin module '{mod}' cannot be imported: {e}") from e
    check_kwargs(cfg, source)
    return cfg


def check_kwargs(cfg: ExperimentConfig, source: str) -> None:
    """Validate the method's and every teacher's kwargs against their typed models (names, types,
    ranges) so a typo or a negative width fails in seconds, before any data is read."""
    from appdistill.methods import METHODS
    from appdistill.registry import kwargs_errors
    from appdistill.teachers.fit import teacher_class

    problems = kwargs_errors(METHODS.get(cfg.method.key, context="method.key"), cfg.method.kwargs, "method.kwargs")
    for name, block in cfg.teachers.items():
        problems += kwargs_errors(teacher_class(block.key, context=f"teachers.{name}.key"), block.kwargs,
                                  f"teachers.{name}.kwargs")
    if problems:
        raise ConfigError(f"file '{source}': invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def resolved_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """The method's and every teacher's kwargs with their defaults filled in (the typed models'
    dumps): what a run actually uses, so a run keyed by it is not reused after a default changes."""
    from appdistill.methods import METHODS
    from appdistill.registry import kwargs_model
    from appdistill.teachers.fit import teacher_class

    def dump(factory: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs_model(factory).model_validate(kwargs or {}).model_dump(mode="json")

    return {"method": dump(METHODS.get(cfg.method.key), cfg.method.kwargs),
            "teachers": {n: dump(teacher_class(b.key), b.kwargs) for n, b in cfg.teachers.items()}}
