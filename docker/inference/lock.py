"""Write docker/inference/requirements.lock from docker/inference/requirements.txt with docker/lock.py's
resolver (the image's platform, torch from PyTorch's CPU index, pip's report):

    python docker/inference/lock.py            # after editing requirements.txt (needs PyPI)
    python docker/inference/lock.py --check    # exit 1 when the lock does not satisfy requirements.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import lock  # noqa: E402  (docker/lock.py: one resolver for both images)

REQUIREMENTS = HERE / "requirements.txt"
LOCK = HERE / "requirements.lock"


def unsatisfied() -> list[str]:
    pins = lock.read_lock(LOCK)
    return [line for line in lock.requirement_lines(REQUIREMENTS)
            if lock.canonical(Requirement(line).name) not in pins
            or not Requirement(line).specifier.contains(pins[lock.canonical(Requirement(line).name)], prereleases=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the lock satisfies requirements.txt")
    if parser.parse_args(argv).check:
        for line in unsatisfied():
            print(f"{LOCK.name} does not satisfy {line}: run python docker/inference/lock.py", file=sys.stderr)
        return 1 if unsatisfied() else 0
    lines = lock.requirement_lines(REQUIREMENTS)
    lock.write(lock.resolve(lines), lock.torch_pin(lines), LOCK)
    text = LOCK.read_text().replace("python docker/lock.py", "python docker/inference/lock.py")
    LOCK.write_text(text.replace("docker/requirements.txt", "docker/inference/requirements.txt")
                    .replace("Azure ML image's", "Azure ML inference image's"))
    print(f"wrote {LOCK} ({len(lock.read_lock(LOCK))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
