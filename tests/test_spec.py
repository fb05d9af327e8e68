"""Feature specs and table validation: every bad input is a SpecError naming where the problem is."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from appdistill.errors import AppDistillError, SpecError
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.features.tables import load_tables

REPO = Path(__file__).resolve().parents[1]


def _feature(spec: dict, name: str) -> dict:
    return next(f for f in spec["features"] if f["name"] == name)


def _load(path: Path) -> Dataset:
    """Parse, load, check and encode: the whole path a user's spec goes through."""
    return Dataset.build(FeatureSpecSet.from_yaml(path))


def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(SpecError) as ei:
        _load(path)
    msg = str(ei.value)
    assert isinstance(ei.value, AppDistillError) and ei.value.exit_code == 2
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in error message:\n{msg}"
    return msg


# --------------------------------------------------------------------------------- valid specs
def test_tiny_spec_parses_and_loads(spec_file):
    path = spec_file()
    spec = FeatureSpecSet.from_yaml(path)
    assert spec.name == "tiny"
    assert spec.base_dir == str(path.parent.resolve())
    assert [f.name for f in spec.visible("student")] == ["user_id", "item_id", "genres", "year", "age", "gender"]
    assert [f.name for f in spec.visible("foundation")] == ["item_id", "title"]
    # a model without its own entry sees the student's features
    assert [f.name for f in spec.visible("dlrm")] == [f.name for f in spec.visible("student")]
    assert (spec.user_key, spec.item_key) == ("user_id", "item_id")
    assert spec.feature("genres").separator == "|"
    assert spec.feature("title").col == "title"
    tables = load_tables(spec)
    assert {k: len(v) for k, v in tables.items()} == {"interactions": 20, "items": 6, "users": 4}


def test_unknown_feature_lookup_is_spec_error(tiny_spec):
    with pytest.raises(SpecError, match="unknown feature 'nope'"):
        tiny_spec.feature("nope")


def test_label_without_threshold_is_identity(tiny_spec_dict):
    tiny_spec_dict["tables"]["interactions"]["label"] = {"column": "click"}
    spec = FeatureSpecSet.from_dict(tiny_spec_dict)
    assert spec.tables["interactions"].label.op == "identity"


def test_fingerprint_tracks_content_not_location(tiny_spec_dict, tmp_path):
    a = FeatureSpecSet.from_dict(tiny_spec_dict, base_dir=str(tmp_path / "a"))
    b = FeatureSpecSet.from_dict(copy.deepcopy(tiny_spec_dict), base_dir=str(tmp_path / "b"))
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    _feature(tiny_spec_dict, "user_id")["dim"] = 8
    assert FeatureSpecSet.from_dict(tiny_spec_dict).fingerprint() != a.fingerprint()


@pytest.mark.parametrize("name", ["ml100k", "synthetic"])
def test_shipped_specs_parse(name):
    spec = FeatureSpecSet.from_yaml(REPO / "feature_specs" / f"{name}.yaml")
    assert spec.name == name and spec.source is not None and spec.source.key == name
    student = spec.visible("student")
    assert student and all(f.kind in ("sparse_id", "id_list", "dense") for f in student)


def test_csv_options_and_tsv(spec_file, tiny_spec_dict, tmp_path):
    path = spec_file()
    users = pd.read_csv(tmp_path / "users.csv")
    users.to_csv(tmp_path / "users.tsv", sep="\t", index=False)
    users.to_csv(tmp_path / "users_semi.csv", sep=";", index=False)
    for file, opts in (("users.tsv", {}), ("users_semi.csv", {"sep": ";"})):
        d = copy.deepcopy(tiny_spec_dict)
        d["tables"]["users"].update(path=file, csv_options=opts)
        tables = load_tables(FeatureSpecSet.from_dict(d, base_dir=str(path.parent)))
        assert tables["users"]["gender"].tolist() == ["m", "f", "f", "m"]


# --------------------------------------------------------------------------------- bad specs
def test_spec_file_missing(tmp_path):
    with pytest.raises(SpecError, match="nope.yaml.*not found"):
        FeatureSpecSet.from_yaml(tmp_path / "nope.yaml")


def test_spec_not_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml.*not valid YAML"):
        FeatureSpecSet.from_yaml(p)


def test_spec_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="list.yaml.*must be a mapping"):
        FeatureSpecSet.from_yaml(p)


def test_unknown_top_level_key(spec_file, tiny_spec_dict):
    tiny_spec_dict["featurez"] = []
    msg = _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "featurez", "unknown key")
    assert "features" not in msg.replace("featurez", "")  # only the typo is reported


def test_unknown_key_inside_feature(spec_file, tiny_spec_dict):
    _feature(tiny_spec_dict, "year")["tranform"] = "log1p"
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "[year]", "tranform", "unknown key")


def test_unknown_key_inside_table(spec_file, tiny_spec_dict):
    tiny_spec_dict["tables"]["items"]["keys"] = "item_id"
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "tables.items.keys", "unknown key")


def test_wrong_kind_name(spec_file, tiny_spec_dict):
    _feature(tiny_spec_dict, "gender")["kind"] = "foo"
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "[gender]", "kind", "'foo'")


def test_dense_feature_over_string_column(spec_file, tiny_spec_dict):
    _feature(tiny_spec_dict, "gender")["kind"] = "dense"
    _expect_error(spec_file(tiny_spec_dict), "users.csv", "feature 'gender'", "column 'gender'", "numeric")


def test_sparse_id_over_fractional_floats(spec_file, tiny_spec_dict, tiny_tables):
    tiny_spec_dict["features"].append({"name": "year_id", "kind": "sparse_id", "table": "items", "column": "year"})
    tiny_tables["items"]["year"] = [1990.5, 2000.0, 2010.0, 2001.0, 1995.0, 2005.0]
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "items.parquet", "feature 'year_id'", "column 'year'",
                  "non-integral")


def test_id_list_string_column_without_separator(spec_file, tiny_spec_dict):
    del _feature(tiny_spec_dict, "genres")["separator"]
    _expect_error(spec_file(tiny_spec_dict), "items.parquet", "feature 'genres'", "column 'genres'", "separator")


def test_text_feature_over_numeric_column(spec_file, tiny_spec_dict):
    _feature(tiny_spec_dict, "title")["column"] = "year"
    _expect_error(spec_file(tiny_spec_dict), "items.parquet", "feature 'title'", "column 'year'", "string")


def test_id_column_of_datetimes(spec_file, tiny_spec_dict, tiny_tables):
    tiny_tables["items"]["released"] = pd.to_datetime(["2020-01-01"] * 6)
    tiny_spec_dict["features"].append({"name": "released", "kind": "sparse_id", "table": "items"})
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "items.parquet", "feature 'released'",
                  "column 'released'", "integers or strings")


def test_missing_table_file(spec_file, tiny_spec_dict):
    tiny_spec_dict["tables"]["items"]["path"] = "movies.parquet"
    _expect_error(spec_file(tiny_spec_dict), "movies.parquet", "not found")


def test_unsupported_table_format(spec_file, tiny_spec_dict, tmp_path):
    path = spec_file(tiny_spec_dict)
    (tmp_path / "items.xlsx").write_text("x")
    tiny_spec_dict["tables"]["items"]["path"] = "items.xlsx"
    path.write_text(yaml.safe_dump(tiny_spec_dict))
    _expect_error(path, "items.xlsx", "unsupported table format")


def test_unreadable_table_file(spec_file, tmp_path):
    path = spec_file()
    (tmp_path / "items.parquet").write_bytes(b"this is not parquet")
    _expect_error(path, "items.parquet", "cannot be read")


def test_missing_feature_column(spec_file, tiny_spec_dict):
    _feature(tiny_spec_dict, "year")["column"] = "release_year"
    _expect_error(spec_file(tiny_spec_dict), "items.parquet", "feature 'year'", "column 'release_year'", "missing")


def test_column_written_twice_in_a_table_file(spec_file, tiny_spec_dict, tiny_tables, tmp_path):
    """A repeated header is refused when the spec reads that column (CSV: pandas would silently read the first
    copy as 'age' and the second as 'age.1'; parquet: pandas would fail with an arrow dump); an unread
    repeated column is dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = spec_file(tiny_spec_dict, tiny_tables)
    users = tmp_path / "users.csv"
    good = users.read_text()
    lines = good.splitlines()
    users.write_text("\n".join([lines[0] + ",age"] + [ln + ",99" for ln in lines[1:]]) + "\n")
    _expect_error(path, "users.csv", "column 'age' of table 'users' appears more than once")
    users.write_text("\n".join([lines[0] + ",note,note"] + [ln + ",x,y" for ln in lines[1:]]) + "\n")
    assert "note" not in _load(path).tables["users"].columns
    users.write_text(good)
    items = tiny_tables["items"]
    cols = [pa.array(items[c]) for c in items.columns]
    pq.write_table(pa.table(cols + [cols[2]], names=[*items.columns, "year"]), tmp_path / "items.parquet")
    _expect_error(path, "items.parquet", "column 'year' of table 'items' appears more than once")


def test_missing_key_column(spec_file, tiny_spec_dict, tiny_tables):
    tiny_tables["users"] = tiny_tables["users"].rename(columns={"user_id": "uid"})
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "users.csv", "key column 'user_id'", "missing")


def test_label_column_absent(spec_file, tiny_spec_dict):
    tiny_spec_dict["tables"]["interactions"]["label"]["column"] = "stars"
    _expect_error(spec_file(tiny_spec_dict), "interactions.parquet", "label column 'stars'", "missing")


def test_label_not_binary_after_transform(spec_file, tiny_spec_dict):
    tiny_spec_dict["tables"]["interactions"]["label"] = {"column": "rating"}  # identity on 1..5 ratings
    _expect_error(spec_file(tiny_spec_dict), "interactions.parquet", "column 'rating'", "row 0: label is 5.0, not 0/1")


def test_label_single_class(spec_file, tiny_spec_dict):
    tiny_spec_dict["tables"]["interactions"]["label"]["threshold"] = 0
    _expect_error(spec_file(tiny_spec_dict), "interactions.parquet", "column 'rating'", "both classes")


def test_label_with_nan(spec_file, tiny_spec_dict, tiny_tables):
    tiny_tables["interactions"].loc[7, "rating"] = np.nan
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "interactions.parquet", "column 'rating'", "row 7",
                  "missing label")


def test_label_string_column(spec_file, tiny_spec_dict, tiny_tables):
    tiny_spec_dict["tables"]["interactions"]["label"] = {"column": "rating_txt"}
    tiny_tables["interactions"]["rating_txt"] = ["yes", "no"] * 10
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "interactions.parquet", "column 'rating_txt'", "numeric")


def test_duplicate_feature_names(spec_file, tiny_spec_dict):
    tiny_spec_dict["features"].append({"name": "year", "kind": "dense", "table": "items", "column": "year"})
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "duplicate feature names", "'year'")


def test_num_embeddings_smaller_than_vocabulary(spec_file, tiny_spec_dict):
    # 5 training items + 1 OOV row = 6 rows needed
    _feature(tiny_spec_dict, "item_id")["num_embeddings"] = 5
    _expect_error(spec_file(tiny_spec_dict), "interactions.parquet", "feature 'item_id'", "num_embeddings=5",
                  "5 ids + 1 OOV row = 6")


def test_num_embeddings_exact_fit_and_hashing_allowed(spec_file, tiny_spec_dict):
    _feature(tiny_spec_dict, "item_id")["num_embeddings"] = 6
    assert len(_load(spec_file(tiny_spec_dict)).processor.vocabs["item_id"]) == 6
    _feature(tiny_spec_dict, "item_id").update(num_embeddings=3, hashing=True)
    ds = _load(spec_file(tiny_spec_dict))
    assert len(ds.processor.vocabs["item_id"]) == 3
    assert set(ds.sparse["item_id"].tolist()) <= {1, 2}


def test_hashing_needs_integer_num_embeddings(spec_file, tiny_spec_dict):
    _feature(tiny_spec_dict, "item_id")["hashing"] = True
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "[item_id]", "hashing needs an integer num_embeddings")


def test_empty_table(spec_file, tiny_spec_dict, tiny_tables):
    tiny_tables["items"] = tiny_tables["items"].iloc[:0]
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "items.parquet", "table 'items' is empty")


def test_nan_in_interaction_key_column(spec_file, tiny_spec_dict, tiny_tables):
    tiny_tables["interactions"]["item_id"] = tiny_tables["interactions"]["item_id"].astype(float)
    tiny_tables["interactions"].loc[5, "item_id"] = np.nan
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "interactions.parquet", "column 'item_id'", "row 5",
                  "NaN in an id column")


def test_nan_in_side_table_key_column(spec_file, tiny_spec_dict, tiny_tables):
    tiny_tables["users"]["user_id"] = [1, 2, None, 4]
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "users.csv", "column 'user_id'", "row 2",
                  "NaN in an id column")


def test_nan_in_sparse_id_feature_column(spec_file, tiny_spec_dict, tiny_tables):
    tiny_tables["users"]["gender"] = ["m", None, "f", "m"]
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "users.csv", "feature 'gender'", "column 'gender'",
                  "row 1", "NaN in an id column")


def test_duplicate_key_in_side_table(spec_file, tiny_spec_dict, tiny_tables):
    tiny_tables["users"]["user_id"] = [1, 2, 2, 4]
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "users.csv", "column 'user_id'", "row 2", "duplicate key")


def test_student_sees_text_feature(spec_file, tiny_spec_dict):
    tiny_spec_dict["visibility"]["student"].append("title")
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "visibility.student", "['title']", "servable")


def test_student_needs_a_servable_feature(spec_file, tiny_spec_dict):
    tiny_spec_dict["visibility"]["student"] = []
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "visibility.student", "servable feature")


def test_dense_only_student_is_accepted(spec_file, tiny_spec_dict):
    tiny_spec_dict["visibility"]["student"] = ["year", "age"]  # was refused: no sparse feature
    spec = FeatureSpecSet.from_yaml(spec_file(tiny_spec_dict))
    assert [f.kind for f in spec.visible("student")] == ["dense", "dense"]


def test_visibility_names_unknown_feature(spec_file, tiny_spec_dict):
    tiny_spec_dict["visibility"]["lightgbm"] = ["year", "plot"]
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "visibility.lightgbm", "['plot']")


def test_feature_on_unknown_table(spec_file, tiny_spec_dict):
    _feature(tiny_spec_dict, "age")["table"] = "people"
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "feature 'age'", "unknown table 'people'")


def test_interactions_table_needs_label(spec_file, tiny_spec_dict):
    del tiny_spec_dict["tables"]["interactions"]["label"]
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "tables.interactions", "label")


def test_side_table_key_must_be_an_interaction_key(spec_file, tiny_spec_dict):
    tiny_spec_dict["tables"]["users"]["key"] = "age"
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", "tables.users", "key")


@pytest.mark.parametrize("split, fragment", [
    ({"by": "random", "valid": 0.5, "test": 0.5}, "valid + test < 1"),
    ({"by": "time", "valid": 0.1, "test": 0.1}, "needs `column`"),
    ({"by": "month"}, "split.by"),
])
def test_bad_split(spec_file, tiny_spec_dict, split, fragment):
    tiny_spec_dict["split"] = split
    _expect_error(spec_file(tiny_spec_dict), "spec.yaml", fragment)


def test_time_split_column_missing(spec_file, tiny_spec_dict):
    tiny_spec_dict["split"]["column"] = "ts"
    _expect_error(spec_file(tiny_spec_dict), "interactions.parquet", "split column 'ts'", "missing")


def test_time_split_names_the_stray_value_in_numbers_stored_as_text(spec_file, tiny_spec_dict, tiny_tables):
    """Epoch seconds read as strings with one stray value: the stray row is named, not row 0 (dates fail on
    every value there, so the first one was blamed)."""
    tiny_spec_dict["split"] = {"by": "time", "column": "timestamp", "valid": 0.2, "test": 0.2}
    ts = tiny_tables["interactions"]["timestamp"].astype(str).astype(object)
    ts.iloc[5] = "yesterday"
    tiny_tables["interactions"]["timestamp"] = ts
    _expect_error(spec_file(tiny_spec_dict, tiny_tables), "column 'timestamp', row 5: 'yesterday'")
    tiny_tables["interactions"]["timestamp"] = ts.where(ts != "yesterday", "105")  # all numbers as text: fine
    assert _load(spec_file(tiny_spec_dict, tiny_tables)).n == 20


def test_unknown_source(tiny_spec_dict):
    d = dict(tiny_spec_dict)
    d["source"] = {"key": "nope"}
    d["tables"] = {k: {kk: vv for kk, vv in t.items() if kk != "path"} for k, t in d["tables"].items()}
    spec = FeatureSpecSet.from_dict(d)
    with pytest.raises(AppDistillError, match="unknown data source 'nope'.*known: .*ml100k"):
        load_tables(spec)


def test_validate_says_what_a_model_without_a_visibility_entry_sees(spec_file, capsys) -> None:
    """``seen by`` lists the spec's visibility entries; a teacher without one (LightGBM, the DLRM on a
    spec that lists only the student) sees the student's features, which validate must say rather than
    suggest that only the student sees them."""
    from appdistill.cli import main

    assert main(["validate", str(spec_file())]) == 0
    out = capsys.readouterr().out
    assert ("visibility: entries for student, foundation; a model without an entry (e.g. a teacher) sees the "
            "student's features") in out, out
