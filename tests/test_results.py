import json

import numpy as np

import pytest

from tme_pipeline.io.results import partial_dir, remove_stale_partials, write_json


def test_folder_appears_only_on_success(tmp_path):
    final = tmp_path / "slides" / "S1"
    with partial_dir(final) as tmp:
        (tmp / "cells.h5ad").write_text("x")
        assert not final.exists()
        assert tmp.name.startswith(".") and tmp.parent == final.parent
    assert (final / "cells.h5ad").read_text() == "x"


def test_success_replaces_previous_whole(tmp_path):
    final = tmp_path / "S1"
    final.mkdir()
    (final / "old.txt").write_text("previous result")
    with partial_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["S1"]


def test_failure_leaves_nothing_and_keeps_previous(tmp_path):
    final = tmp_path / "S1"
    final.mkdir()
    (final / "old.txt").write_text("previous result")
    with pytest.raises(RuntimeError):
        with partial_dir(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("crash mid-slide")
    assert (final / "old.txt").read_text() == "previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["S1"]


def test_stale_partials_removed(tmp_path):
    (tmp_path / ".S2.partial").mkdir()
    (tmp_path / "S1").mkdir()
    removed = remove_stale_partials(tmp_path)
    assert [p.name for p in removed] == [".S2.partial"]
    assert [p.name for p in tmp_path.iterdir()] == ["S1"]


def test_write_json_atomic_and_strict(tmp_path):
    path = tmp_path / "run.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    # JSON has no NaN: a non-finite number is written as null, never as the invalid token NaN
    write_json(path, {"a": float("nan"), "b": np.float32(np.inf), "c": np.arange(2)})
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert json.loads(path.read_text()) == {"a": None, "b": None, "c": [0, 1]}
