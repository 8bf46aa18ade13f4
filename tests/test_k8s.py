"""k8s/: plain manifests equal to the chart's default render, kept in sync by `make k8s`; and YAML lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from chart import BACKEND_APIS, KUBERNETES_VERSIONS  # the minors of the chart's kubeVersion range

ROOT = Path(__file__).resolve().parent.parent

MANAGED_BY = "app.kubernetes.io/managed-by"


def tool(name: str) -> str:
    """A tool from PATH or next to this Python (the venv's bin); missing is a failure, not a skip."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} not found on PATH or in {Path(sys.executable).parent}; run `make tools`")
    return found


def kustomization_objects() -> list[dict]:
    kustomization = yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((ROOT / "k8s" / resource).read_text()) if d]
    return docs


def test_k8s_is_in_sync_with_the_chart():
    tool("helm")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_k8s.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_k8s_objects_equal_the_default_render_without_helm_ownership():
    out = subprocess.run([tool("helm"), "template", "ddpm", str(ROOT / "helm"), "--skip-tests"],
                         capture_output=True, text=True, check=True).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    for doc in rendered:
        assert doc["metadata"]["labels"].pop(MANAGED_BY) == "Helm"
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    plain = kustomization_objects()
    assert sorted(plain, key=key) == sorted(rendered, key=key)
    assert MANAGED_BY not in (ROOT / "k8s").joinpath("job.yaml").read_text()
    assert not [d for d in plain if MANAGED_BY in d["metadata"].get("labels", {})]


def test_k8s_objects_validate_strictly_on_every_minor():
    docs = kustomization_objects()
    # the default install: TensorBoard is the training pod's sidecar, no Deployment
    assert {d["kind"] for d in docs} == {"ConfigMap", "PersistentVolumeClaim", "Service", "Job", "ServiceAccount",
                                         "Role", "RoleBinding"}
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_yaml_lint():
    targets = ["k8s", "helm/values.yaml", "helm/Chart.yaml", "helm/checkov-exceptions.yaml", ".yamllint.yaml"]
    result = subprocess.run([tool("yamllint"), "--strict", "-c", ".yamllint.yaml", *targets],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_chart_is_clean_yaml(tmp_path):
    """The templates' whitespace handling: every backend renders without yamllint findings."""
    for backend in BACKEND_APIS:
        apis = [arg for api in BACKEND_APIS[backend] for arg in ("--api-versions", api)]
        out = subprocess.run(
            [tool("helm"), "template", "ddpm", str(ROOT / "helm"), "--set", f"backend={backend}", "--set", "gpus=16",
             "--set", "storage.accessModes={ReadWriteMany}", "--set", "storage.storageClass=standard-rwx",
             "--set", "push.enabled=true", "--set", "push.tokenSecret=hf", "--set", "config.hub_model_id=me/m",
             "--set", "tolerations[0].operator=Exists", "--set", "storage.fixOwnership=true", "--set", "queueName=gpu-queue",
             *apis],
            capture_output=True, text=True, check=True).stdout
        path = tmp_path / f"{backend}.yaml"
        path.write_text(out)
        result = subprocess.run([tool("yamllint"), "--strict", "-c", str(ROOT / ".yamllint.yaml"), str(path)],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{backend}:\n{result.stdout}"
