"""The Dockerfile (which cannot be built here): hadolint-clean, pinned, and consistent with
pyproject.toml and the launch scripts it relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint missing: it is a test dependency (pip install -e '.[test]')"
    return found


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"Dockerfile has no 'ARG {name}=...'"
    return match.group(1)


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_an_official_cuda_devel_pytorch_image_pinned_by_tag() -> None:
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert len(froms) == 1
    image, _, tag = froms[0].partition(":")
    assert image == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-devel", tag), tag
    assert tag.split("-")[0] == _arg("TORCH_VERSION")


def test_versions_agree_with_pyproject() -> None:
    project = PYPROJECT["project"]
    assert Version(_arg("PYTHON_VERSION")) in SpecifierSet(project["requires-python"])
    torch_req = next(Requirement(d) for d in project["dependencies"] if d.startswith("torch"))
    assert torch_req.name == "torch"
    assert Version(_arg("TORCH_VERSION")) in torch_req.specifier
    # The image checks at build time that its Python and torch are the ones declared above.
    assert "sys.version.startswith('${PYTHON_VERSION}')" in DOCKERFILE
    assert "torch.__version__.startswith('${TORCH_VERSION}')" in DOCKERFILE


def test_installs_this_project_and_horovod_with_nccl() -> None:
    name = PYPROJECT["project"]["name"]
    assert name in PYPROJECT["tool"]["setuptools"]["packages"]
    assert re.search(r'pip install [^\n]*"\.\[test\]"', DOCKERFILE)
    assert f"import {name}" in DOCKERFILE
    assert "SECONDORDER_HOROVOD_GPU=nccl" in DOCKERFILE
    assert "bash launch/install_horovod.sh python" in DOCKERFILE
    assert "hvd.nccl_built()" in DOCKERFILE
    for script in ("install_horovod.sh", "torchrun.sh", "horovodrun.sh"):
        path = REPO / "launch" / script
        assert path.exists() and os.access(path, os.X_OK), f"launch/{script} must be executable"
        assert f"launch/{script}" in DOCKERFILE  # used or documented as an entry point


def test_runs_as_a_non_root_user() -> None:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "data", "runs", "wandb"):
        assert entry in ignored
