"""What an Azure ML node's blob-mounted outputs refuse, enforced in the emulated nodes' Python.

blobfuse, which mounts Azure ML's rw_mount outputs, has no chmod or chown (on a flat-namespace
account blobfuse2 answers success and does nothing) and no hard links, and it renames a folder
file by file (a reader may see half of it) and a file as a copy plus a delete. The emulator
runs each node's `python` through this file (a `python` first on the nodes' PATH execs it),
which installs a Python audit hook (sys.addaudithook sees every os.chmod, os.chown, os.link,
os.rename and os.replace, pathlib's and shutil's included) that refuses, under any output
mount path of the job:
- chmod and chown of anything, and a hard link;
- a rename of a folder;
- a rename of a file that nlpwf's own code asks for (nlpwf writes plain files there, each once).
A library's rename of a single file stays allowed (safetensors, for one, saves weights beside
their name and renames them): blobfuse does that, as a copy and a delete. An audit hook sees
only what goes through Python: native code calling the OS itself (torch's C++, safetensors'
Rust) is watched from outside by the strace test (tests/test_azureml_mounts.py).

Usage: python noderules.py RULES.json ARGS...: RULES.json holds {"mounts": [path, ...]}; ARGS
are the node command's own Python arguments, `-m module ...`, `-c code ...` or `script ...`,
run as Python runs them. Any other form runs as it is, without the rules. Standard library
only: this file runs before anything else, outside the job's code.
"""
import json
import os
import runpy
import sys

NLPWF = "nlpwf"
_WHAT = {"os.chmod": "chmod", "os.chown": "chown", "os.link": "a hard link", "os.rename": "rename"}


def _path(path, dir_fd=None) -> str | None:
    """An audit event's path argument as an absolute path (a descriptor: the file it names)."""
    try:
        if isinstance(path, int):
            return os.readlink(f"/proc/self/fd/{path}")
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.abspath(path)
    except (OSError, TypeError, ValueError):
        return None


def _caller() -> str:
    """The module that asked for the operation: the first frame outside the standard library
    (os, pathlib, shutil, tempfile ...) and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        spec = frame.f_globals.get("__spec__")
        name = spec.name if spec is not None else frame.f_globals.get("__name__", "")
        if frame.f_code.co_filename != __file__ and name.partition(".")[0] not in sys.stdlib_module_names:
            return name
        frame = frame.f_back
    return ""


class MountRules:
    """The audit hook: raises PermissionError on what a blob mount cannot do (see the module doc)."""

    def __init__(self, mounts: list[str]) -> None:
        self.mounts = [os.path.realpath(m) for m in mounts]

    def mount_of(self, path: str | None) -> str | None:
        if path is None:
            return None
        real = os.path.realpath(path)
        return next((m for m in self.mounts if real == m or real.startswith(m + os.sep)), None)

    def __call__(self, event: str, args: tuple) -> None:
        what = _WHAT.get(event)
        if what is None:
            return
        if event in ("os.rename", "os.link"):
            src, dst = _path(args[0], args[2]), _path(args[1], args[3])
            paths = [src, dst]
        else:
            src = _path(args[0], args[-1])
            paths = [src]
        mount = next((m for m in map(self.mount_of, paths) if m), None)
        if mount is None:
            return
        if event == "os.rename":
            if os.path.isdir(src):
                what = "a rename of a folder (blobfuse moves it file by file: a reader can see half of it)"
            elif _caller().partition(".")[0] == NLPWF:
                what = "a rename by nlpwf (blobfuse copies and deletes: nlpwf writes each file once, in place)"
            else:
                return  # a library's single file: blobfuse copies and deletes it
        raise PermissionError(f"emulated Azure ML output mount {mount}: {what} is not supported on a blob mount "
                              f"({event} {' -> '.join(p for p in paths if p)})")


def run(argv: list[str]) -> None:
    """Run ARGS as `python ARGS` would, under the rules."""
    if argv[:1] == ["-m"] and len(argv) > 1:
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[:1] == ["-c"] and len(argv) > 1:
        sys.argv = ["-c", *argv[2:]]
        sys.path.insert(0, "")
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - what `python -c` does
    elif argv and not argv[0].startswith("-"):
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
    else:
        print(f"noderules: python {' '.join(argv)} runs without the output mount rules", file=sys.stderr)
        os.execv(sys.executable, [sys.executable, *argv])


def main() -> None:
    del sys.path[0]  # this file's folder (nlpwf/azureml) is no place for the job to import from
    with open(sys.argv[1]) as f:
        rules = json.load(f)
    sys.addaudithook(MountRules(rules["mounts"]))
    run(sys.argv[2:])


if __name__ == "__main__":
    main()
