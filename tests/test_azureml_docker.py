"""The training image's build context. No Docker engine here: these check what can be checked
without building it (files, pins, the SDK's view of the context)."""
from __future__ import annotations

import configparser
import re

from nlpwf import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"


def requirement_lines(text: str) -> set[str]:
    return {re.sub(r"\s+", "", line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")}


def test_requirements_match_setup_cfg():
    setup = configparser.ConfigParser()
    setup.read(PROJECT_ROOT / "setup.cfg")
    install_requires = requirement_lines(setup["options"]["install_requires"])
    image = requirement_lines((DOCKER / "requirements.txt").read_text())
    assert install_requires <= image, install_requires - image
    assert {n.split(">")[0] for n in image if n.startswith(("mlflow-skinny", "azureml-mlflow"))} == {"mlflow-skinny", "azureml-mlflow"}


def test_dockerfile_essentials():
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0].startswith("FROM python:3.11-slim")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    assert re.search(r"^ENV LD_PRELOAD=\S*libjemalloc\.so\.2", text, re.M)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    for line in instructions:  # everything COPYed comes from the context
        if line.startswith("COPY "):
            assert (DOCKER / line.split()[1]).exists(), line


def test_sdk_accepts_the_build_context():
    from azure.ai.ml.entities import BuildContext, Environment

    env = Environment(build=BuildContext(path=str(DOCKER)))
    spec = env._to_dict()
    assert spec["build"]["path"] == str(DOCKER)
    assert len(spec["version"]) == 64  # content hash: Azure rebuilds only when docker/ changes
