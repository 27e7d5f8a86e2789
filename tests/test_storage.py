"""The one atomic-write helper (`codistill.storage`): local files through a temp name and a rename, other file
systems in one put; nothing half-written is ever left under the final name."""

import uuid

import pytest

from codistill import storage


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "sub")
    return f"memory://codistill-test-{uuid.uuid4().hex}/sub"


def names(root: str) -> list[str]:
    fs, path = storage.url_to_fs(root)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def test_write_atomically_replaces_the_whole_file_and_leaves_nothing_else(root):
    target = f"{root}/x.json"
    storage.write_atomically(target, "first version, long\n")
    storage.write_atomically(target, b"second\n")
    with storage.open(target, "rb") as f:
        assert f.read() == b"second\n"
    assert names(root) == ["x.json"]


def test_an_exclusive_write_keeps_the_file_already_there(root):
    target = f"{root}/run.json"
    assert storage.write_atomically(target, "mine", replace=False)
    assert not storage.write_atomically(target, "another", replace=False)
    with storage.open(target, "r") as f:
        assert f.read() == "mine"
    assert names(root) == ["run.json"]


def test_a_local_write_goes_through_the_temp_name(tmp_path):
    seen = []
    with storage.atomic_writer(str(tmp_path / "shard.tfrecord")) as f:
        f.write(b"data")
        seen = sorted(p.name for p in tmp_path.iterdir())
    temp, = seen
    assert storage.is_temp(temp) and temp.endswith("-shard.tfrecord")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.tfrecord"]


def test_a_write_cut_short_leaves_nothing_behind(root):
    target = f"{root}/shard.tar"
    storage.write_atomically(f"{root}/other", "kept")
    with pytest.raises(RuntimeError, match="disk gone"):
        with storage.atomic_writer(target) as f:
            f.write(b"half a shard")
            raise RuntimeError("disk gone")
    assert names(root) == ["other"]


def test_a_failed_write_keeps_the_local_file_it_was_to_replace(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("complete")
    with pytest.raises(RuntimeError):
        with storage.atomic_writer(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]

