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


def _stages() -> list[tuple[str, str, str]]:
    """``(image, tag, stage name)`` of every ``FROM``."""
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", DOCKERFILE, re.MULTILINE)
    return [(*ref.partition(":")[::2], name) for ref, name in froms]


def test_two_stages_on_matching_official_pytorch_images_pinned_by_tag() -> None:
    (build_image, build_tag, build_name), (run_image, run_tag, _) = _stages()
    assert build_image == run_image == "pytorch/pytorch"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-devel", build_tag), build_tag
    # the same torch, CUDA and cuDNN at run time, without the compilers
    assert run_tag == build_tag.removesuffix("-devel") + "-runtime"
    assert build_tag.split("-")[0] == _arg("TORCH_VERSION")
    assert build_name == "horovod-build"


def test_runtime_stage_takes_only_the_horovod_wheel() -> None:
    runtime = DOCKERFILE[DOCKERFILE.index("AS runtime") :]
    copies = re.findall(r"^COPY\s+--from=(\S+)\s+(\S+)", runtime, re.MULTILINE)
    assert copies == [("horovod-build", "/opt/dist/")]
    assert "pip install --no-cache-dir /opt/dist/horovod-*.whl" in runtime
    assert "install_horovod.sh" not in runtime  # nothing is compiled in the runtime image


def test_one_nccl_horovod_built_against_torchs() -> None:
    build = DOCKERFILE[: DOCKERFILE.index("AS runtime")]
    assert 'HOROVOD_NCCL_HOME="${TORCH_NCCL_HOME}" HOROVOD_NCCL_LINK=SHARED' in build
    assert "import nvidia" in build  # torch's nvidia-nccl package, not the system's NCCL
    runtime = DOCKERFILE[DOCKERFILE.index("AS runtime") :]
    assert "if ldconfig -p | grep -q libnccl; then" in runtime  # no second (system) NCCL


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
