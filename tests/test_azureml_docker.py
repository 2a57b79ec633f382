"""The training image's build context. No Docker engine here: these check what can be checked
without building it (files, pins, the lock, the SDK's view of the context)."""
from __future__ import annotations

import configparser
import functools
import importlib.metadata
import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from nlpwf import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"
NODE_EXTRA = "azureml_node"  # setup.cfg's extra of what the image adds to install_requires


def requirement_lines(text: str) -> set[str]:
    return {re.sub(r"\s+", "", line.split("#", 1)[0]) for line in text.splitlines()
            if line.split("#", 1)[0].strip()}


def setup_cfg() -> configparser.ConfigParser:
    setup = configparser.ConfigParser()
    setup.read(PROJECT_ROOT / "setup.cfg")
    return setup


def node_requirements() -> set[str]:
    """What the nodes need: install_requires and the azureml_node extra."""
    setup = setup_cfg()
    return (requirement_lines(setup["options"]["install_requires"])
            | requirement_lines(setup["options.extras_require"][NODE_EXTRA]))


def lock_module():
    spec = importlib.util.spec_from_file_location("docker_lock", DOCKER / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_are_setup_cfgs_node_requirements():
    """Line for line, but torch: the package asks for a range, the image installs one release of
    it from PyTorch's CPU index (pinned exactly, inside that range)."""
    image, wanted = requirement_lines((DOCKER / "requirements.txt").read_text()), node_requirements()
    torch_image, torch_range = ({r for r in lines if Requirement(r).name == "torch"} for lines in (image, wanted))
    assert image - torch_image == wanted - torch_range, image ^ wanted
    [pin], [package] = torch_image, torch_range
    assert Requirement(package).specifier.contains(pin.split("==")[1]), (pin, package)


def test_the_lock_pins_a_version_satisfying_every_node_requirement():
    lock = lock_module().read_lock(DOCKER / "requirements.lock")
    for line in sorted(node_requirements()):
        req = Requirement(line)
        name = lock_module().canonical(req.name)
        assert name in lock, f"{req.name} is not in docker/requirements.lock: run python docker/lock.py"
        assert req.specifier.contains(lock[name], prereleases=True), f"lock has {req.name}=={lock[name]}, setup.cfg wants {line}"
    assert lock_module().main(["--check"]) == 0
    # the CPU image: none of the CUDA stack PyPI's torch brings
    assert not [n for n in lock if n.startswith(("nvidia-", "cuda-")) or n == "triton"]


def test_one_mlflow_for_emulation_and_the_nodes():
    """azureml-mlflow bounds mlflow-skinny; the tracking and dev extras use the image's range, and
    the pinned version is what the lock has."""
    setup = setup_cfg()
    extras = setup["options.extras_require"]
    ranges = {extra: {r for r in requirement_lines(extras[extra]) if r.startswith("mlflow-skinny")}
              for extra in ("tracking", "dev", NODE_EXTRA)}
    assert len(set().union(*ranges.values())) == 1, ranges
    lock = lock_module().read_lock(DOCKER / "requirements.lock")
    [mlflow_range] = ranges[NODE_EXTRA]
    assert Requirement(mlflow_range).specifier.contains(lock["mlflow-skinny"])
    try:
        installed = importlib.metadata.version("mlflow-skinny")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mlflow-skinny is not installed here")
    assert installed == lock["mlflow-skinny"], (f"this environment has mlflow-skinny {installed}, the image "
                                                f"{lock['mlflow-skinny']}: pip install -e .[dev]")


def test_torch_cpu_requirements_match_the_installed_cpu_wheel():
    """lock.py resolves torch's requirements as the CPU wheel states them."""
    lock = lock_module()
    version = importlib.metadata.version("torch")
    if not version.endswith("+cpu") or version.split("+")[0] != lock.torch_pin(lock.requirement_lines()):
        pytest.skip(f"torch {version} here is not the image's CPU wheel")
    cpu = {r for r in importlib.metadata.requires("torch") if "extra ==" not in r}
    assert cpu == set(lock.TORCH_CPU_REQUIRES)


def test_dockerfile_essentials():
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0].startswith("FROM python:3.11-slim")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    assert lock_module().torch_pin(lock_module().requirement_lines()) == "2.13.0"
    assert "pip install --no-deps -r /tmp/requirements.lock" in text and "pip check" in text
    assert re.search(r"^ENV LD_PRELOAD=\S*libjemalloc\.so\.2", text, re.M)
    # root, as Azure ML's own images: nothing shows a non-root user can write the mounts
    assert [line for line in instructions if line.startswith("USER ")] == []
    assert "python -m nlpwf.azureml.remote nlpwf_job.pkl" in text
    assert "python -m nlpwf ..." not in text and "nlpwf/distributed.py" not in text
    for line in instructions:  # everything COPYed comes from the context
        if line.startswith("COPY "):
            assert (DOCKER / line.split()[1]).exists(), line


def test_sdk_accepts_the_build_context():
    from azure.ai.ml.entities import BuildContext, Environment

    env = Environment(build=BuildContext(path=str(DOCKER)))
    spec = env._to_dict()
    assert spec["build"]["path"] == str(DOCKER)
    assert len(spec["version"]) == 64  # content hash: Azure rebuilds only when docker/ changes


# --- what the nodes import is in the image -----------------------------------------------------

# The node's entry (`python -m nlpwf.azureml.remote`) runs nlpwf's task (nlpwf.cli), whose stages
# include training and its plots. Every module they can import, at module level or inside a
# function, must come from a package of the lock, except these, which the image leaves out on
# purpose and the launcher refuses (azureml/job.py, refuse_what_the_image_lacks) or nlpwf uses
# only when installed:
NOT_IN_IMAGE = {
    "neural_compressor": "stage=quantize is refused for Azure",
    "wandb": "logger=wandb is refused for Azure",
    "intel_extension_for_pytorch": "optional: applied when its wheel is installed (docker/Dockerfile)",
    "oneccl_bindings_for_pytorch": "optional: the ccl backend when its wheel is installed (docker/Dockerfile)",
}
NODE_ENTRIES = ("nlpwf.azureml.remote", "nlpwf.cli", "nlpwf.stages.train", "nlpwf.results.plots")


def nlpwf_modules() -> dict[str, Path]:
    root = PROJECT_ROOT
    out = {}
    for path in sorted((root / "nlpwf").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Every module name an nlpwf module imports (`from a.b import c` gives a.b and a.b.c)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def node_imports() -> set[str]:
    """The modules outside nlpwf that the node's entry can reach, following nlpwf's own imports."""
    import sys

    modules = nlpwf_modules()
    packages = {m for m in modules if modules[m].name == "__init__.py"}
    todo, seen, external = list(NODE_ENTRIES), set(), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in imported_names(modules[module], module, module in packages):
            if name.split(".")[0] == "nlpwf":
                todo += [name] if name in modules else []
            elif name.split(".")[0] not in sys.stdlib_module_names and name != "__future__":
                external.add(name)
    return external


def distribution_of(name: str) -> str | None:
    """The installed distribution that provides module `name` (or its nearest importable parent)."""

    while name:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            break
        name = name.rpartition(".")[0]
    if not name:
        return None
    origin = Path(spec.origin if spec.origin not in (None, "namespace") else list(spec.submodule_search_locations)[0])
    for dist in _packages_distributions().get(name.split(".")[0], []):
        if any(origin == path or path.is_relative_to(origin) for path in _installed_files(dist)):
            return dist
    return None


# Both read every installed distribution's metadata: once per test session, not once per module
# looked up (about 70 of them, 30 s on 2 cores).
@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def _installed_files(dist: str) -> tuple[Path, ...]:
    return tuple(Path(f.locate()) for f in importlib.metadata.distribution(dist).files or [])


def test_every_module_the_nodes_import_is_in_the_lock():
    lock = lock_module()
    pinned = set(lock.read_lock(DOCKER / "requirements.lock"))
    external = node_imports()
    assert "matplotlib.pyplot" in external and "torch" in external  # the plots and training are followed
    missing = {}
    for name in sorted(external):
        if name.split(".")[0] in NOT_IN_IMAGE:
            continue
        dist = distribution_of(name)
        if dist is None or lock.canonical(dist) not in pinned:
            missing[name] = dist
    assert not missing, f"imported on the nodes but not in docker/requirements.lock: {missing} (add them to " \
                        "docker/requirements.txt and setup.cfg's azureml_node extra, then run python docker/lock.py)"
