"""Outputs as blob mounts take them: the emulator's per-node views (other nodes' files show late),
a checkpoint marker built from every rank's report, and results written with plain writes on a
mount and flushed before any rename on a local disk. Real files, threads, processes and strace."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from nlpwf.azureml import mountview
from nlpwf.results import files
from nlpwf.runtime import workers
from nlpwf.training import checkpoints


def _until(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_node_sees_another_nodes_files_late_and_storage_at_once(tmp_path):
    store = tmp_path / "store"
    (store / "old").mkdir(parents=True)
    (store / "old" / "a.bin").write_text("written by an earlier job")
    syncer = mountview.Syncer({"out": store}, tmp_path / "scratch", nodes=2, delay_s=1.0)
    v0, v1 = syncer.outputs["out"].views
    syncer.start()
    try:
        # mounted with what storage holds
        assert (v0 / "old" / "a.bin").read_text() == (v1 / "old" / "a.bin").read_text() == "written by an earlier job"
        (v0 / "ckpt").mkdir()
        (v0 / "ckpt" / "rng_state_0.pth").write_text("node 0")
        _until(lambda: (store / "ckpt" / "rng_state_0.pth").exists())  # write-through
        assert not (v1 / "ckpt" / "rng_state_0.pth").exists()  # node 1's listing does not show it yet
        _until(lambda: (v1 / "ckpt" / "rng_state_0.pth").exists())
        assert (v1 / "ckpt" / "rng_state_0.pth").read_text() == "node 0"
        # a deletion: gone from storage at once, from the other node's view later
        shutil.rmtree(v0 / "old")
        _until(lambda: not (store / "old").exists())  # and no empty folder stays in storage
        assert (v1 / "old" / "a.bin").exists()
        _until(lambda: not (v1 / "old" / "a.bin").exists())
        (v1 / "last.txt").write_text("node 1, just before the job ends")
    finally:
        syncer.stop()
    # after the last pass storage has every node's writes, and the last writer of a path wins
    assert (store / "last.txt").read_text() == "node 1, just before the job ends"
    assert files.tree_files(store) == ["ckpt/rng_state_0.pth", "last.txt"]


_RANK = """
import sys
from pathlib import Path
import torch.distributed as dist
from nlpwf.runtime import collective, contract
from nlpwf.training import checkpoints

rank = contract.from_env()
collective.init_process_group(rank, 120)
folder = Path(sys.argv[1].replace("NODE", str(rank.node_rank))) / "checkpoint-1"   # this node's view
folder.mkdir(parents=True, exist_ok=True)
(folder / f"rng_state_{rank.rank}.pth").write_bytes(b"r" * (10 + rank.rank))
if rank.is_main:
    (folder / "model.safetensors").write_bytes(b"w" * 100)
marked = checkpoints.mark_by_every_rank(folder, 1, rank.is_main)   # what CheckpointCallback.on_save does
if rank.is_main:
    print("MARKED", marked, sorted(p.name for p in folder.iterdir()))
dist.destroy_process_group()
"""


def test_a_checkpoint_marker_lists_the_files_of_ranks_that_rank_0_cannot_see(tmp_path, capfd):
    """Two ranks on two nodes write into one checkpoint of a shared output; node 0's view does not
    show node 1's file yet, and the marker lists it all the same: every rank reports its own."""
    store = tmp_path / "store"
    store.mkdir()
    syncer = mountview.Syncer({"checkpoints": store}, tmp_path / "scratch", nodes=2, delay_s=600.0)
    template = str(syncer.outputs["checkpoints"].views[0]).replace("node-0", "node-NODE")
    syncer.start()
    try:
        code = workers.run_workers([sys.executable, "-c", _RANK, template], 2, 1, threads=1)
    finally:
        syncer.stop()
    out = capfd.readouterr().out
    assert code == 0, out
    listing = re.search(r"MARKED True (\[.*\])", out).group(1)
    assert "rng_state_1.pth" not in listing  # rank 0 could not see rank 1's file when it marked the checkpoint
    view0 = syncer.outputs["checkpoints"].views[0] / "checkpoint-1"
    marker = json.loads((view0 / checkpoints.MARKER).read_text())
    assert marker["files"] == {"model.safetensors": 100, "rng_state_0.pth": 10, "rng_state_1.pth": 11}
    assert marker["world_size"] == 2 and marker["ranks"] == [["model.safetensors", "rng_state_0.pth"], ["rng_state_1.pth"]]
    # in storage every listed file is there: the checkpoint is complete; node 0's stale view is not (yet)
    assert checkpoints.is_complete(store / "checkpoint-1") and not checkpoints.is_complete(view0)


def test_two_ranks_that_see_one_file_at_different_sizes_mark_nothing(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    assert not checkpoints.mark_complete(tmp_path, 3, [{"trainer_state.json": 2}, {"trainer_state.json": 1}])
    assert not (tmp_path / checkpoints.MARKER).exists() and not checkpoints.is_complete(tmp_path)


def test_a_published_folder_is_read_by_its_marker_only(tmp_path):
    local = tmp_path / "local"
    (local / "model").mkdir(parents=True)
    (local / "metrics.json").write_text('{"eval_accuracy": 0.5}')
    (local / "model" / "config.json").write_text("{}")
    mount = tmp_path / "mount"
    assert files.publish(local, mount) == {"metrics.json": 22, "model/config.json": 2}
    (mount / "stray.txt").write_text("a file another writer left, not published")
    got = files.copy_listed(mount, tmp_path / "download")
    assert set(got) == {"metrics.json", "model/config.json"} and not (tmp_path / "download" / "stray.txt").exists()
    # a listed file cut short (or a publication under way: its marker is removed first) is no result
    (mount / "metrics.json").write_text("{")
    with pytest.raises(RuntimeError, match="is not complete"):
        files.copy_listed(mount, tmp_path / "again")
    files.publish(local, mount)
    (local / "model" / "config.json").unlink()
    (mount / files.MARKER).unlink()
    assert files.listed(mount) is None


_WRITE = """
import os, sys
from pathlib import Path
os.umask(0o027)
from nlpwf.results import files
files.write_json(Path(sys.argv[1]), {"eval_accuracy": 0.5})
print("MODE", oct(Path(sys.argv[1]).stat().st_mode & 0o777), oct(files.umask()))
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_local_result_is_flushed_before_its_rename_and_the_umask_is_only_read(tmp_path):
    """The file's data is on disk before its name points at it, the folder's entry after; the
    process-wide umask is never set to read it (other threads create files meanwhile)."""
    trace, target = tmp_path / "trace", tmp_path / "job" / "metrics.json"
    target.parent.mkdir()
    run = subprocess.run(["strace", "-f", "-y", "-e", "trace=umask,fsync,fdatasync,rename,renameat,renameat2",
                          "-o", str(trace), sys.executable, "-c", _WRITE, str(target)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "MODE 0o640 0o27" in run.stdout  # the file gets the umask's mode, and the umask is read right
    calls = [line for line in trace.read_text().splitlines() if str(target.parent) in line or "umask(" in line]
    umask_calls = [c for c in calls if "umask(" in c]
    assert len(umask_calls) == 1 and "umask(027)" in umask_calls[0]  # the script's own, none of nlpwf's
    calls = [c for c in calls if "umask(" not in c]
    kinds = [("fsync file" if ".metrics.json." in c and "fsync(" in c else
              "rename" if "rename" in c and c.rstrip().endswith("= 0") else
              "fsync dir" if re.search(rf"fsync\(\d+<{re.escape(str(target.parent))}>\)", c) else "other") for c in calls]
    assert kinds == ["fsync file", "rename", "fsync dir"], calls
