"""Atomic files: a failed write leaves the old file as it was and no temporary file behind."""

import pytest

from spoctl.fsutil import atomic_file, write_text_atomic


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "data.txt"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.txt"]
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.txt"]
