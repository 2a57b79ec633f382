"""Write docker/requirements.lock: the exact version of everything the Azure ML image installs,
resolved from docker/requirements.txt for the image's platform (Linux x86_64, CPython 3.11).

    python docker/lock.py            # after editing requirements.txt (needs PyPI)
    python docker/lock.py --check    # exit 1 when the lock does not match requirements.txt's pins

pip resolves it (`pip install --dry-run --ignore-installed --report`: nothing is installed
here), run by a CPython 3.11 on Linux x86_64 like the image's (the script refuses any other).
torch comes from PyTorch's CPU index in the image, whose wheel needs none of the CUDA packages
PyPI's torch pulls in: torch's requirements are taken as the CPU wheel states them
(TORCH_CPU_REQUIRES), the CUDA stack is dropped from pip's report, and torch is pinned to
requirements.txt's version. The Dockerfile installs the lock with --no-deps and runs
`pip check`, so the image is exactly this list.
tests/test_azureml_docker.py checks the lock against setup.cfg and requirements.txt.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
LOCK = HERE / "requirements.lock"
PYTHON = "3.11"
# Requires-Dist of torch 2.13.0+cpu (PyTorch's CPU index), without its optional extras.
TORCH_CPU_REQUIRES = ("filelock", "typing-extensions>=4.10.0", "setuptools>=77.0.3", "sympy>=1.13.3",
                      "networkx>=2.5.1", "jinja2", "fsspec>=0.8.5")
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path = REQUIREMENTS) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def torch_pin(lines: list[str]) -> str:
    [pin] = [line for line in lines if canonical(NAME.match(line).group(1)) == "torch"]
    if "==" not in pin:
        raise SystemExit(f"{REQUIREMENTS}: torch must be pinned exactly (torch==X.Y.Z): it comes from the CPU index")
    return pin.split("==", 1)[1].strip()


def check_platform() -> None:
    """pip resolves for the interpreter running it: the image's (restricting pip with --platform
    would refuse packages published only as source, such as hydra-core's antlr4 runtime)."""
    import platform

    here = (sys.platform, platform.machine(), f"{sys.version_info.major}.{sys.version_info.minor}",
            sys.implementation.name)
    if here != ("linux", "x86_64", PYTHON, "cpython"):
        raise SystemExit(f"run docker/lock.py with CPython {PYTHON} on Linux x86_64, the image's platform (this is {here})")


def resolve(lines: list[str]) -> dict[str, str]:
    """{name: version} of everything pip would install for the image's platform."""
    check_platform()
    wanted = [line for line in lines if canonical(NAME.match(line).group(1)) != "torch"] + list(TORCH_CPU_REQUIRES)
    with tempfile.TemporaryDirectory() as tmp:
        reqs, report = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        reqs.write_text("\n".join(wanted) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "-r", str(reqs)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pip could not resolve {REQUIREMENTS}:\n{done.stderr[-3000:]}")
        installs = json.loads(report.read_text())["install"]
    return needed(installs, wanted)


def needed(installs: list[dict], roots: list[str]) -> dict[str, str]:
    """{name: version} of the packages of pip's report that the roots need, with torch's
    requirements those of the CPU wheel: the CUDA stack PyPI's torch pulls in (nvidia-*, triton,
    ...) is dropped, as the image never installs it. Markers are evaluated for this interpreter,
    with the extras each package is asked for."""
    from packaging.requirements import Requirement

    items = {canonical(i["metadata"]["name"]): i for i in installs}
    extras: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name not in items:
            continue
        new = set(req.extras) - extras.get(name, set())
        if name in extras and not new:
            continue
        extras.setdefault(name, set()).update(req.extras)
        if name == "torch":
            deps = [Requirement(r) for r in TORCH_CPU_REQUIRES]
        else:
            deps = [Requirement(r) for r in items[name]["metadata"].get("requires_dist", [])]
        for dep in deps:
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (extras[name] or {""})):
                todo.append(dep)
    return {items[n]["metadata"]["name"]: items[n]["metadata"]["version"] for n in extras}


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of the lock."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==", 1)
            out[canonical(name)] = version.strip()
    return out


def write(pins: dict[str, str], torch_version: str, path: Path = LOCK) -> None:
    pins = {**{k: v for k, v in pins.items() if canonical(k) != "torch"}, "torch": torch_version}
    lines = [f"{name}=={pins[name]}" for name in sorted(pins, key=canonical)]
    header = ("# The Azure ML image's exact packages (Linux x86_64, CPython 3.11), generated by\n"
              "#   python docker/lock.py\n"
              "# from docker/requirements.txt. Do not edit: change requirements.txt and run it again.\n"
              "# torch comes from PyTorch's CPU index (the Dockerfile); the rest from PyPI, with --no-deps.\n")
    path.write_text(header + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the lock satisfies requirements.txt")
    args = parser.parse_args(argv)
    lines = requirement_lines()
    if args.check:
        from packaging.requirements import Requirement

        lock = read_lock()
        bad = [line for line in lines if (r := Requirement(line)) and (canonical(r.name) not in lock
               or not r.specifier.contains(lock[canonical(r.name)], prereleases=True))]
        for line in bad:
            print(f"{LOCK.name} does not satisfy {line}: run python docker/lock.py", file=sys.stderr)
        return 1 if bad else 0
    write(resolve(lines), torch_pin(lines))
    print(f"wrote {LOCK} ({len(read_lock())} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
