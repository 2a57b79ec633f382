"""Check nlpwf against both ends of the torch and transformers ranges setup.cfg declares.

    python tools/check_ranges.py                          # the oldest pair, then the newest pair
    python tools/check_ranges.py --pair 2.13.0 5.0.0      # one pair: torch, transformers
    python tools/check_ranges.py --newest-torch 2.14.1    # where pip caps torch below the range's newest
    python tools/check_ranges.py --pair 2.6.0 5.2.0 --user-install   # the package alone, as a user installs it

For each pair: a throwaway venv; torch and transformers installed first, as a user's own stack
would be; then nlpwf the README's way (`pip install -e '.[dev]' -e ./launchers`), checking that
it changed neither and downgraded nothing else; then the unpadding tests (tests/test_unpad.py:
padded and unpadded steps equal, and the same tiny trainings, single process and DDP, with and
without unpadding). The ends are the oldest and newest releases on the index that the declared
specifiers admit; a torch newer than this machine's pip allows (a CUDA build of several GB) is
named with --newest-torch. `--user-install` installs the package as a user does
(`pip install -e . -e ./launchers`, plus pytest) instead of the dev extra: at torch's oldest end
the dev extra cannot install, because neural-compressor[pt] pulls the newest torchao, which needs
a newer torch (pip cannot bound it by the torch installed). Prints one line per pair and exits 1
if any failed. Each venv holds a full torch (2-6 GB) and is deleted afterwards unless --keep.
"""
from __future__ import annotations

import argparse
import configparser
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers")
TESTS = ["tests/test_unpad.py", "-q", "-p", "no:cacheprovider"]


def declared() -> dict[str, Requirement]:
    """torch's and transformers' requirements in setup.cfg's install_requires."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines()]
    reqs = {r.name: r for r in (Requirement(line) for line in lines if line and not line.startswith("#"))}
    return {name: reqs[name] for name in PACKAGES}


def releases(name: str) -> list[Version]:
    """The releases of `name` on the index pip uses (one `pip index versions` query)."""
    out = run([sys.executable, "-m", "pip", "index", "versions", name], capture=True)
    listed = re.search(r"Available versions: (.*)", out).group(1)
    return sorted({Version(v.strip()) for v in listed.split(",")})


def ends(req: Requirement) -> tuple[str, str]:
    """The oldest and newest final releases `req` admits."""
    admitted = [v for v in releases(req.name) if not v.is_prerelease and not v.local and v in req.specifier]
    if not admitted:
        raise SystemExit(f"check_ranges: error: no release of {req.name} matches {req.specifier}")
    return str(admitted[0]), str(admitted[-1])


def run(cmd: list[str], capture: bool = False, log: Path | None = None, cwd: Path = ROOT) -> str:
    """Run `cmd`; its output to `log` (appended) or returned. Raises on a non-zero exit."""
    if log is None:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=capture, text=True).stdout or ""
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        subprocess.run(cmd, cwd=cwd, check=True, stdout=f, stderr=subprocess.STDOUT)
    return ""


def installed(python: Path) -> dict[str, str]:
    out = run([str(python), "-m", "pip", "list", "--format=json"], capture=True)
    return {p["name"].lower(): p["version"] for p in json.loads(out)}


def check_pair(torch_version: str, transformers_version: str, work: Path, user_install: bool = False) -> str:
    """Install the pair, then nlpwf, then run the tests; one line saying what happened."""
    venv = work / f"torch{torch_version}-transformers{transformers_version}"
    log = work / f"{venv.name}.log"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    started = time.monotonic()
    step = "venv"
    try:
        run([sys.executable, "-m", "venv", str(venv)], log=log)
        run(pip + ["-U", "pip"], log=log)  # pip 23 cannot resolve nlpwf's dependencies (README)
        step = "install the pair"
        run(pip + [f"torch=={torch_version}", f"transformers=={transformers_version}"], log=log)
        before = installed(python)
        step = "install nlpwf"
        package = ["-e", ".", "-e", "./launchers", "pytest", "pytest-xdist"] if user_install else ["-e", ".[dev]", "-e", "./launchers"]
        run(pip + package, log=log)
        after = installed(python)
        changed = [f"{name} {before[name]} -> {after.get(name)}" for name in PACKAGES if after.get(name) != before[name]]
        changed += [f"{name} {v} -> {after.get(name)}" for name, v in before.items() if name not in PACKAGES
                    and name in after and Version(after[name]) < Version(v)]
        if changed:
            return f"FAIL torch {torch_version}, transformers {transformers_version}: installing nlpwf changed {', '.join(changed)}"
        step = "tests"
        run([str(python), "-m", "pytest", *TESTS], log=log)
        summary = log.read_text().strip().splitlines()[-1]
    except subprocess.CalledProcessError:
        tail = "\n    ".join(log.read_text().strip().splitlines()[-15:])
        return f"FAIL torch {torch_version}, transformers {transformers_version}: {step} failed (log {log}):\n    {tail}"
    minutes = (time.monotonic() - started) / 60
    how = "nlpwf (package only)" if user_install else "nlpwf[dev]"
    return (f"ok   torch {after['torch']}, transformers {after['transformers']}: nothing changed by installing {how}; "
            f"tests/test_unpad.py: {summary} ({minutes:.0f} min in all)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", nargs=2, action="append", metavar=("TORCH", "TRANSFORMERS"), help="a pair to check instead of the ends")
    p.add_argument("--newest-torch", help="the newest torch to check, where pip here caps it below the range's newest")
    p.add_argument("--work", type=Path, help="where the venvs and logs go (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the venvs")
    p.add_argument("--user-install", action="store_true", help="install the package and pytest, not the dev extra")
    args = p.parse_args(argv)
    pairs = args.pair
    if not pairs:
        reqs = declared()
        (torch_old, torch_new), (tf_old, tf_new) = ends(reqs["torch"]), ends(reqs["transformers"])
        print(f"setup.cfg: {reqs['torch']}, {reqs['transformers']}", flush=True)
        pairs = [(torch_old, tf_old), (args.newest_torch or torch_new, tf_new)]
    work = args.work or Path(tempfile.mkdtemp(prefix="nlpwf-ranges-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for torch_version, transformers_version in pairs:
        print(f"torch {torch_version}, transformers {transformers_version} ...", flush=True)
        results.append(check_pair(torch_version, transformers_version, work, args.user_install))
        print(results[-1], flush=True)
        if not args.keep:
            shutil.rmtree(work / f"torch{torch_version}-transformers{transformers_version}", ignore_errors=True)
    print("\n".join(["", "summary:", *results]))
    return 0 if all(r.startswith("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
