import json

import pytest

from relaytune.errors import RelaytuneError
from relaytune.io import atomic_folder, atomic_write_jsonl, atomic_write_text, read_jsonl, read_jsonl_lines, read_yaml


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.jsonl"
    atomic_write_text(path, "old\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(path, rows())
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_jsonl_reader_reports_each_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n{not json\n\n[1, 2]\n" + json.dumps({"b": 2}) + "\n")
    lines = read_jsonl_lines(path)
    assert [(n, p is None) for n, _, p in lines] == [(1, True), (2, False), (4, False), (5, True)]
    with pytest.raises(RelaytuneError, match=r"rows.jsonl:2: invalid JSON"):
        read_jsonl(path)
    with pytest.raises(RelaytuneError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_atomic_folder_swaps_in_whole_or_not_at_all(tmp_path):
    target = tmp_path / "epoch1"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first" and oct(target.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed half-way")
    assert (target / "a.txt").read_text() == "first"
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["epoch1"]  # no temp or old folder left behind


def test_atomic_folder_without_replace_keeps_the_first_one_made(tmp_path):
    # Two processes materialising the same model: the first rename wins, the second copy is dropped.
    target = tmp_path / "model"
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "weights").write_text("first")
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "weights").write_text("second")
    assert (target / "weights").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_file_that_is_not_utf8_is_one_line_naming_the_file_line_and_byte(tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_bytes(b'{"a": 1}\n{"b": "M\xfcller"}\n')
    with pytest.raises(RelaytuneError, match=r"train.jsonl:2: not UTF-8 \(byte 17 is 0xfc\)"):
        read_jsonl_lines(rows)
    handbook = tmp_path / "facts.yaml"
    handbook.write_bytes(b"name: Universit\xe4t\n")
    with pytest.raises(RelaytuneError, match=r"facts.yaml:1: not UTF-8 \(byte 15 is 0xe4\)"):
        read_yaml(handbook)
