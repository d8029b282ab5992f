"""Which checkpoint folders are whole (vlm_preserve.checkpoints), on planted folders; the kill tests that produce
them for real: tests/test_kill.py (Python API), tests/test_llava_train.py (llava-train)."""
from vlm_preserve import checkpoints as ck


def _folder(run, name, *files):
    path = run / name
    path.mkdir(parents=True)
    for f in files:
        (path / f).write_text("x")
    return path


def test_a_folder_announced_and_never_marked_is_cut_and_one_written_without_the_plugin_is_not(tmp_path):
    upstream = _folder(tmp_path, "checkpoint-2", "model.safetensors", "trainer_state.json")  # no plugin files
    whole = _folder(tmp_path, "checkpoint-4", "model.safetensors")
    ck.begin(str(whole))
    ck.mark_complete(str(whole))
    cut = _folder(tmp_path, "checkpoint-6", "model.safetensors")
    ck.begin(str(cut))  # killed before it was marked
    staging = _folder(tmp_path, "tmp-checkpoint-8", "model.safetensors")
    assert not ck.is_cut(str(upstream)) and not ck.is_cut(str(whole)) and ck.is_cut(str(cut))
    assert (cut / "model.safetensors").exists()  # begin() keeps a folder that was not cut
    assert not (tmp_path / (ck.SAVING_PREFIX + "checkpoint-4")).exists()
    found, skipped = ck.latest_complete(str(tmp_path))
    assert found == str(whole) and sorted(skipped) == sorted([str(cut), str(staging)])
    (whole / ck.COMPLETE_FILE).unlink()
    ck.begin(str(whole))
    found, _ = ck.latest_complete(str(tmp_path))
    assert found == str(upstream)  # the unmarked upstream one is upstream's to judge, as without the plugin
    assert all(str(p) in ck.cut_line(str(p)) for p in (cut, staging))


def test_begin_clears_a_cut_write_and_upstream_staging_before_the_step_is_saved_again(tmp_path):
    cut = _folder(tmp_path, "checkpoint-6", "stale-shard.bin")
    ck.begin(str(cut))
    staging = _folder(tmp_path, "tmp-checkpoint-6", "stale-shard.bin")
    ck.begin(str(cut))
    assert not cut.exists() and not staging.exists()
    assert (tmp_path / (ck.SAVING_PREFIX + "checkpoint-6")).exists()
    _folder(tmp_path, "checkpoint-6", "model.safetensors")
    ck.mark_complete(str(cut))
    assert ck.is_complete(str(cut)) and not (tmp_path / (ck.SAVING_PREFIX + "checkpoint-6")).exists()
    assert ck.latest_complete(str(tmp_path)) == (str(cut), [])
    assert ck.latest_complete(str(tmp_path / "absent")) == (None, [])
