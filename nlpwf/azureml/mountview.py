"""Each emulated node's own view of the job's shared outputs, as blob mounts give it.

On Azure ML every node mounts a rw_mount output with blobfuse. A node's own writes go to
storage as they happen and it sees them at once; files that other nodes write appear in its
listings only once its attribute and listing cache expires, and their deletions too. A node
that lists a shared folder right after the others wrote into it can miss their files.

The emulator gives each node a folder of its own for each output, its view, and a Syncer
thread runs beside the nodes, every SCAN_S:
- a file that a node creates or replaces in its view (a new inode at a path) is hard-linked
  into the output's folder in the datastore at once (write-through), and into every other
  node's view `delay_s` later;
- a file that a node deletes from its view is deleted from the datastore at once and from the
  other views `delay_s` later (only where they still hold the same file).
At the start each view holds the datastore's files (a job mounting an existing output sees
them all). When the processes have ended a last pass puts every node's writes in the
datastore; a killed job (a preemption) leaves what was synced until then.

What it models: other nodes' new and deleted files showing late, write-through to storage,
the last writer of a path winning. What it does not: a view sees at once what another node
writes later into a file it already has (one inode), and can see a file still being written
(blobfuse uploads on close) - readers that check a marker's sizes are safe from both. A folder
exists through its files only, as in blob storage: an empty folder stays in its node's view.
Hard links need the views and the datastore on one filesystem.
"""
from __future__ import annotations

import heapq
import logging
import os
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nlpwf.errors import UserError

log = logging.getLogger(__name__)

SCAN_S = 0.2
VIEWS_DIR = "outputs"  # <scratch>/outputs/node-N/NAME: node N's view of output NAME


@dataclass
class Output:
    store: Path                    # the output's folder in the datastore
    views: list[Path]              # one per node
    known: list[dict[str, int]] = field(default_factory=list)  # per view: path -> inode it had at the last pass


def files_of(folder: Path) -> dict[str, int]:
    """{relative path: inode} of the regular files under `folder`."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not os.path.islink(path):
                found[os.path.relpath(path, folder)] = st.st_ino
    return found


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def _link(source: Path, target: Path) -> bool:
    """`target` becomes another name of `source`'s file (replacing what was there); whether it did."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        os.link(source, target)
        return True
    except FileNotFoundError:  # the source went meanwhile: the next pass sees that
        return False


def _prune(folder: Path, root: Path) -> None:
    """Remove `folder` and its parents up to `root` while they are empty (blob storage has no empty folders)."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


class Syncer:
    """The views of a job's outputs (see the module's docstring)."""

    def __init__(self, stores: dict[str, Path], scratch: Path, nodes: int, delay_s: float) -> None:
        self.delay_s = delay_s
        self.outputs = {name: Output(store, [scratch / VIEWS_DIR / f"node-{n}" / name for n in range(nodes)])
                        for name, store in stores.items()}
        self.pending: list[tuple[float, int, str, int, str, int, bool]] = []  # (due, seq, output, node, path, inode, link?)
        self.seq = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="emulated-blob-mounts", daemon=True)

    def view_binding(self, name: str) -> str:
        """What `${{outputs.NAME}}` becomes in the node's shell command: its own node's view."""
        prefix, _, suffix = str(self.outputs[name].views[0]).rpartition(f"{os.sep}node-0{os.sep}")
        return f'{shlex.quote(f"{prefix}{os.sep}node-")}"$NODE_RANK"{shlex.quote(f"{os.sep}{suffix}")}'

    def mount_paths(self) -> list[Path]:
        return [p for o in self.outputs.values() for p in (o.store, *o.views)]

    def start(self) -> None:
        for out in self.outputs.values():
            for view in out.views:
                view.mkdir(parents=True, exist_ok=True)
                if os.stat(view).st_dev != os.stat(out.store).st_dev:
                    raise UserError(f"the emulator links files between {view} and {out.store}, on different filesystems: "
                                    "put hydra.launcher.emulate_dir and hydra.launcher.emulate_datastore on one")
            for path in files_of(out.store):
                for view in out.views:
                    _link(out.store / path, view / path)
            out.known = [files_of(view) for view in out.views]
        self.thread.start()

    def stop(self) -> None:
        """After the nodes: the last pass, so the datastore holds every node's writes."""
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join()
        self.sync(time.monotonic())

    def _loop(self) -> None:
        while not self.stop_event.wait(SCAN_S):
            try:
                self.sync(time.monotonic())
            except OSError as e:  # a view changing under the scan: the next pass catches up
                log.debug("emulated blob mounts: %s", e)

    def sync(self, now: float) -> None:
        for name, out in self.outputs.items():
            for node, view in enumerate(out.views):
                self._node_changes(name, out, node, files_of(view), now)
        while self.pending and self.pending[0][0] <= now:
            _, _, name, node, path, inode, link = heapq.heappop(self.pending)
            self._apply(self.outputs[name], node, path, inode, link)

    def _node_changes(self, name: str, out: Output, node: int, seen: dict[str, int], now: float) -> None:
        known = out.known[node]
        for path, inode in seen.items():
            if known.get(path) != inode:  # written by this node: to storage now, to the others later
                known[path] = inode
                if _link(out.views[node] / path, out.store / path):
                    self._later(name, out, node, path, inode, True, now)
        for path in set(known) - set(seen):  # deleted by this node
            inode = known.pop(path)
            if _inode(out.store / path) == inode:
                (out.store / path).unlink()
                _prune((out.store / path).parent, out.store)
            self._later(name, out, node, path, inode, False, now)

    def _later(self, name: str, out: Output, origin: int, path: str, inode: int, link: bool, now: float) -> None:
        for node in range(len(out.views)):
            if node != origin:
                self.seq += 1
                heapq.heappush(self.pending, (now + self.delay_s, self.seq, name, node, path, inode, link))

    def _apply(self, out: Output, node: int, path: str, inode: int, link: bool) -> None:
        """A file of another node reaches this node's view (or leaves it), unless this node wrote
        that path itself since the last pass (the later writer wins)."""
        target, known = out.views[node] / path, out.known[node]
        current = _inode(target)
        if current is not None and current != known.get(path):
            return
        if not link:
            if current == inode:
                target.unlink()
                known.pop(path, None)
            return
        source = out.store / path
        if current != inode and _inode(source) == inode and _link(source, target):
            known[path] = inode
