"""The inference server's environment: docker/inference/requirements.txt is install_requires plus
setup.cfg's `serve` extra, its lock satisfies it, and the lock holds the pins the server needs
beside packages the dev environment holds at other versions (why it is an environment of its own)."""
from __future__ import annotations

import configparser
import subprocess
import sys

from packaging.requirements import Requirement

from nlpwf import PROJECT_ROOT

INFERENCE = PROJECT_ROOT / "docker" / "inference"


def lines(text: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def test_requirements_are_install_requires_plus_the_serve_extra():
    cfg = configparser.ConfigParser()
    cfg.read(PROJECT_ROOT / "setup.cfg")
    wanted = lines(cfg["options"]["install_requires"]) + lines(cfg["options.extras_require"]["serve"])
    image = lines((INFERENCE / "requirements.txt").read_text())
    # torch: the package asks for a range, the image installs one release of it (the CPU index's)
    assert [r for r in image if not r.startswith("torch")] == [r for r in wanted if not r.startswith("torch")]
    [pin], [package] = [r for r in image if r.startswith("torch")], [r for r in wanted if r.startswith("torch")]
    assert Requirement(package).specifier.contains(pin.split("==")[1]), (pin, package)


def test_the_lock_satisfies_the_requirements_and_pins_the_server():
    done = subprocess.run([sys.executable, str(INFERENCE / "lock.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pins = dict(line.split("==", 1) for line in lines((INFERENCE / "requirements.lock").read_text()))
    assert pins["azureml-inference-server-http"] == "1.5.1"
    server = Requirement("opentelemetry-sdk==1.33.0")
    assert server.specifier.contains(pins["opentelemetry-sdk"])
    assert "mlflow-skinny" not in pins and "wandb" not in pins  # the training image's tracking stays out
