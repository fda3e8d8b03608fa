"""write_atomic: a failed write leaves the old file as it was, and no temporary file behind."""

import stat

import pytest

from tqslite.files import write_atomic


def test_a_complete_write_replaces_the_file_readable_by_everyone(tmp_path):
    target = tmp_path / "new" / "folder" / "plan.json"
    assert write_atomic(target, lambda tmp: tmp.write_text("first")) == target
    write_atomic(target, lambda tmp: tmp.write_text("second"))
    assert target.read_text() == "second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["plan.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"good")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ha")  # half a file, then the disk fills up
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]
