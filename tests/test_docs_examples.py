"""The worked examples of docs/architecture.md run as written: a toy teacher and a toy method, each
one file with one register line, used through `plugins:` in a config."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from appdistill.config import load_config
from tests.test_bench import CONFIG, SPEC

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_doc_examples_plug_in_and_train(tmp_path: Path, monkeypatch) -> None:
    from appdistill.methods import METHODS
    from appdistill.pipeline import fit_committee
    from appdistill.pipeline import train
    from appdistill.teachers import TEACHERS

    # the plugins register process-wide: give them copies of the registries, put back afterwards, so
    # tests that walk every registered teacher or method (tests/test_contract.py) never meet them
    monkeypatch.setattr(TEACHERS, "_items", dict(TEACHERS._items))
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    pkg = tmp_path / "docpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for code in blocks:
        name = re.match(r"# my_pkg/(\w+)\.py", code).group(1)
        (pkg / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    cfg = {**CONFIG, "plugins": ["docpkg.popularity", "docpkg.confident_kd"],
           "teachers": {"pop": {"key": "popularity", "kwargs": {"prior": 5.0}}},
           "method": {"key": "confident_kd", "kwargs": {"margin": 0.1}},
           "train": {**CONFIG["train"], "epochs": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    c = load_config(tmp_path / "c.yaml", [f"teachers_dir={tmp_path / 't'}"])
    res = fit_committee(c, tmp_path / "t", progress=False)
    assert 0.5 < res["pop"]["test"]["auc"] < 1
    m = train(c, tmp_path / "run", progress=False)
    assert 0.5 < m["test"]["auc"] < 1 and m["method"] == "confident_kd"
    hist = yaml.safe_load((tmp_path / "run" / "history.json").read_text())
    assert {"train_bce", "train_kd"} <= set(hist["epochs"][0])
    # the typed kwargs of the plugin are checked like the built-ins'
    import pytest

    from appdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="method.kwargs.margin"):
        load_config(tmp_path / "c.yaml", ["method.kwargs.margin=-1"])
    for mod in ("docpkg.popularity", "docpkg.confident_kd", "docpkg"):
        sys.modules.pop(mod, None)


def test_docs_config_names_every_key_of_the_spec_and_the_config() -> None:
    """docs/config.md is the reference: a key added to a spec or config model must appear in it."""
    from appdistill.config import (ContentSection, EvalSection, ExperimentConfig, StudentSection, TrackingSection,
                                   TrainSection, TransferSection)
    from appdistill.features.spec import FeatureSpec, FeatureSpecSet, LabelSpec, SplitSpec, TableSpec

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    models = {"": ExperimentConfig, "student.": StudentSection, "train.": TrainSection, "eval.": EvalSection,
              "spec:": FeatureSpecSet, "table:": TableSpec, "feature:": FeatureSpec, "split:": SplitSpec,
              "label:": LabelSpec, "content:": ContentSection, "transfer:": TransferSection,
              "tracking:": TrackingSection}
    missing = [f"{where}{name}" for where, model in models.items() for name in model.model_fields
               if name != "base_dir" and not re.search(rf"[`.{{, ]{name}[`:,}}. ]", text)]
    assert not missing, f"docs/config.md does not mention: {missing}"
