"""Feature specs: the YAML file that declares a data set.

A spec is data only (``yaml.safe_load`` + pydantic, ``extra="forbid"`` everywhere so a typo is an
error, not a silently ignored key). It says where the tables are, which column is which kind of
feature, how the label is made, which model may see which feature, and how to split.

Example:
    >>> spec = FeatureSpecSet.from_yaml("feature_specs/ml100k.yaml")
    >>> [f.name for f in spec.visible("student")]
    ['user_id', 'item_id', ...]
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appdistill.errors import AppDistillError, SpecError

FeatureKind = Literal["sparse_id", "id_list", "dense", "text", "image"]
#: kinds the student may see: it must be servable without any text or image encoder.
SERVABLE_KINDS = ("sparse_id", "id_list", "dense")
SPARSE_KINDS = ("sparse_id", "id_list")


#: the most values a YAML document may expand to through its aliases (a spec or config has a few
#: thousand); a "billion laughs" document is refused instead of exhausting memory in validation
MAX_YAML_VALUES = 1_000_000


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents whose aliases expand past :data:`MAX_YAML_VALUES`
    values or refer to themselves (``&a [*a]``)."""

    def compose_document(self):  # noqa: ANN201 - PyYAML's signature
        node = super().compose_document()
        _expanded_size(node)
        return node


class _YamlRefused(Exception):
    pass


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    return []


def _expanded_size(root: Any) -> int:
    """Values of the document once every alias is expanded (memoised per node: linear in its size)."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            open_.discard(nid)
            size[nid] = 1 + sum(size[id(c)] for c in _children(node))
            if size[nid] > MAX_YAML_VALUES:
                raise _YamlRefused(f"its aliases expand to more than {MAX_YAML_VALUES:,} values (an alias bomb?)")
            continue
        if nid in size:
            continue
        open_.add(nid)
        stack.append((node, True))
        for c in _children(node):
            if id(c) in open_:
                raise _YamlRefused(f"an alias refers to a node that contains it (line {c.start_mark.line + 1}): "
                                   "recursive documents are not accepted")
            if id(c) not in size:
                stack.append((c, False))
    return size[id(root)]


def load_yaml(text: str, source: str, error: type[AppDistillError] = SpecError) -> Any:
    """``yaml.safe_load`` that refuses alias bombs, recursive aliases and absurd nesting with a reason.

    Args:
        text: the YAML document.
        source: the file name for messages.
        error: the exception class to raise (``SpecError`` for specs, ``ConfigError`` for configs).
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _YamlRefused as e:
        raise error(f"file '{source}': refused: {e}") from None
    except RecursionError:
        raise error(f"file '{source}': refused: the YAML is nested too deeply") from None
    except yaml.YAMLError as e:
        raise error(f"file '{source}': not valid YAML: {e}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


LabelValue = str | int | float | bool


class LabelSpec(_Strict):
    """How the binary label is made from a column: ``op(column, threshold)``, ``column == positive``
    (string labels such as ``>50K``: ``label: {column: income, positive: ">50K"}``; a list means any
    of these values), or the column as is (0/1)."""

    column: str
    op: Literal["ge", "gt", "le", "lt", "eq", "identity"] = "ge"
    threshold: float | None = None
    positive: LabelValue | list[LabelValue] | None = None

    @model_validator(mode="after")
    def _check(self) -> LabelSpec:
        if self.positive is not None and self.threshold is not None:
            raise ValueError("give either `positive` (the value(s) that make a label 1) or `op`/`threshold`, "
                             "not both")
        if isinstance(self.positive, list) and not self.positive:
            raise ValueError("`positive` is an empty list")
        if self.op != "identity" and self.threshold is None:
            object.__setattr__(self, "op", "identity")
        return self


class TableSpec(_Strict):
    """One table: a file (parquet/csv, relative to the spec file) or a table of the spec's source."""

    path: str | None = None
    key: list[str] | str
    label: LabelSpec | None = None
    time_column: str | None = None
    csv_options: dict[str, Any] = Field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [self.key] if isinstance(self.key, str) else list(self.key)


class FeatureSpec(_Strict):
    """One feature.

    Args:
        name: unique feature name (the KJT key for sparse features).
        kind: ``sparse_id`` (one id per row), ``id_list`` (several ids, e.g. genres), ``dense``
            (a number), ``text`` or ``image`` (foundation-model inputs only).
        table: the table holding the column.
        column: defaults to ``name``.
        num_embeddings: ``auto`` (vocabulary size + 1 OOV row) or a fixed size.
        hashing: map ids by a stable hash into ``num_embeddings`` buckets (large id spaces).
        dim: embedding dimension of the student's table for this feature.
        separator: for ``id_list`` stored as a string (``"Action|Comedy"``).
        pooling: ``sum`` or ``mean`` pooling of ``id_list`` embeddings.
        min_count: ids seen fewer times in training go to OOV.
        transform: dense transform: ``none``, ``log1p``, ``standardize``, ``log1p_standardize``.
        missing: ``sparse_id``/``id_list``: what a missing (NaN/empty) id means: ``error`` (default:
            refused, naming the row) or ``oov`` (the OOV row, like an unseen id). ``id_list`` cells
            that are missing are empty lists either way.
        encoder: foundation encoder name for ``text``/``image`` features.
        root: directory that relative image paths are resolved against.
    """

    name: str
    kind: FeatureKind
    table: str
    column: str | None = None
    # an embedding table beyond 2^31 rows cannot be indexed by the embedding kernels
    num_embeddings: Annotated[int, Field(ge=2, le=2**31 - 1)] | Literal["auto"] = "auto"
    hashing: bool = False
    dim: int = Field(default=16, ge=1, le=4096)
    separator: str | None = None
    pooling: Literal["sum", "mean"] = "mean"
    min_count: int = Field(default=1, ge=1)
    transform: Literal["none", "log1p", "standardize", "log1p_standardize"] = "standardize"
    missing: Literal["error", "oov"] = "error"
    encoder: str | None = None
    root: str | None = None

    @property
    def col(self) -> str:
        return self.column or self.name

    @model_validator(mode="after")
    def _check(self) -> FeatureSpec:
        if self.hashing and self.num_embeddings == "auto":
            raise ValueError(f"feature '{self.name}': hashing needs an integer num_embeddings")
        if isinstance(self.num_embeddings, int) and self.num_embeddings < 2:
            raise ValueError(f"feature '{self.name}': num_embeddings must be >= 2")
        if self.dim < 1:
            raise ValueError(f"feature '{self.name}': dim must be >= 1")
        if self.missing != "error" and self.kind not in SPARSE_KINDS:
            raise ValueError(f"feature '{self.name}': `missing` applies to sparse_id/id_list features (a dense "
                             "NaN is imputed with the training mean)")
        return self


class SplitSpec(_Strict):
    """How interactions are split. ``cold_item``: test (and valid) items never occur in training."""

    by: Literal["random", "time", "cold_item"] = "random"
    valid: float = 0.1
    test: float = 0.1
    seed: int = 0
    column: str | None = None  # time column for ``by: time``

    @model_validator(mode="after")
    def _check(self) -> SplitSpec:
        if not (0 < self.valid < 1 and 0 < self.test < 1 and self.valid + self.test < 1):
            raise ValueError("split: valid and test must be fractions in (0, 1) with valid + test < 1")
        if self.by == "time" and not self.column:
            raise ValueError("split: by: time needs `column` (the timestamp column)")
        return self


class SourceSpec(_Strict):
    """A built-in table provider (``ml100k``, ``synthetic``) instead of files."""

    key: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class FeatureSpecSet(_Strict):
    """The parsed feature spec."""

    name: str
    source: SourceSpec | None = None
    tables: dict[str, TableSpec]
    features: list[FeatureSpec]
    visibility: dict[str, list[str]]
    split: SplitSpec = SplitSpec()
    #: directory of the spec file; relative table paths and image roots resolve against it
    base_dir: str = "."

    @field_validator("tables")
    @classmethod
    def _tables(cls, v: dict[str, TableSpec]) -> dict[str, TableSpec]:
        if "interactions" not in v:
            raise ValueError("tables: an 'interactions' table is required")
        if v["interactions"].label is None:
            raise ValueError("tables.interactions: a `label` is required")
        return v

    @model_validator(mode="after")
    def _check(self) -> FeatureSpecSet:
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate feature names: {dup}")
        for f in self.features:
            if f.table not in self.tables:
                raise ValueError(f"feature '{f.name}': unknown table '{f.table}' (tables: {sorted(self.tables)})")
            if f.kind == "id_list" and f.table == "interactions" and f.separator is None:
                pass  # list-valued parquet column: fine
        for t_name, t in self.tables.items():
            if t_name != "interactions":
                missing = [k for k in t.keys if k not in self.tables["interactions"].keys]
                if len(t.keys) != 1 or missing:
                    raise ValueError(
                        f"tables.{t_name}: key must be one column that is also in the interactions key "
                        f"{self.tables['interactions'].keys}; got {t.keys}")
            if t.path is None and self.source is None:
                raise ValueError(f"tables.{t_name}: needs `path` (or a spec-level `source`)")
        if "student" not in self.visibility:
            raise ValueError("visibility: a 'student' entry is required")
        for model, feats in self.visibility.items():
            unknown = [n for n in feats if n not in names]
            if unknown:
                raise ValueError(f"visibility.{model}: unknown features {unknown}")
        bad = [f.name for f in self.visible("student") if f.kind not in SERVABLE_KINDS]
        if bad:
            raise ValueError(
                f"visibility.student: features {bad} are text/image; the student must be servable "
                "without foundation encoders (give them to a teacher instead)")
        # dense-only students are fine (a GBDT-led table of numeric columns): the student then has no
        # embedding tables (RankingModel, shard_model and the serving model handle that case)
        if not any(f.kind in SERVABLE_KINDS for f in self.visible("student")):
            raise ValueError("visibility.student: the student needs at least one servable feature "
                             "(sparse_id, id_list or dense)")
        return self

    # ------------------------------------------------------------------ access
    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise SpecError(f"spec '{self.name}': unknown feature '{name}'")

    def visible(self, model: str) -> list[FeatureSpec]:
        """Features ``model`` may see, in spec order (unknown model -> the student's set)."""
        allowed = set(self.visibility.get(model, self.visibility["student"]))
        return [f for f in self.features if f.name in allowed]

    @property
    def user_key(self) -> str:
        return self.tables["interactions"].keys[0]

    @property
    def item_key(self) -> str:
        return self.tables["interactions"].keys[-1]

    def fingerprint(self) -> str:
        """Stable hash of the spec content (not of the data)."""
        raw = self.model_dump(exclude={"base_dir"})
        # settings added later are left out at their defaults, so the fingerprint of a spec that does not
        # use them (and the runs, teachers and caches keyed by it) stays what it was
        for f in raw["features"]:
            if f.get("missing") == "error":
                del f["missing"]
        for t in raw["tables"].values():
            if t.get("label") is not None and t["label"].get("positive") is None:
                del t["label"]["positive"]
        payload = json.dumps(raw, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | Path) -> FeatureSpecSet:
        path = Path(path)
        if path.is_dir():
            raise SpecError(f"file '{path}': is a directory; give the feature spec's YAML file")
        if not path.is_file():
            raise SpecError(f"file '{path}': feature spec not found")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"file '{path}': cannot be read as text ({type(e).__name__}: {e})") from None
        raw = load_yaml(text, str(path))
        return cls.from_dict(raw, source=str(path), base_dir=str(path.parent.resolve()))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<dict>", base_dir: str = ".") -> FeatureSpecSet:
        if not isinstance(raw, dict):
            raise SpecError(f"file '{source}': a feature spec must be a mapping, got {type(raw).__name__}")
        raw = dict(raw)
        raw.setdefault("base_dir", base_dir)
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise SpecError(f"file '{source}': invalid feature spec:\n{_format_errors(e, raw)}") from None


def _format_errors(e: ValidationError, raw: dict[str, Any]) -> str:
    """Render pydantic errors with feature names instead of list indices."""
    lines = []
    for err in e.errors():
        loc = list(err["loc"])
        if len(loc) >= 2 and loc[0] == "features" and isinstance(loc[1], int):
            try:
                loc[1] = f"[{raw['features'][loc[1]].get('name', loc[1])}]"
            except (IndexError, AttributeError, KeyError, TypeError):
                pass
        where = ".".join(str(x) for x in loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)
