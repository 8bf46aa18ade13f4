"""A static audit of the rendered chart and the Dockerfile with checkov (pinned, `make checkov`): every failed check
is fixed or listed with its reason in helm/checkov-exceptions.yaml; an unexplained finding fails the test, and so
does an exception that no longer matches a finding.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from chart import PUSH_JOB, RWX, merge, pod_templates, render

ROOT = Path(__file__).resolve().parent.parent
EXCEPTIONS = ROOT / "helm" / "checkov-exceptions.yaml"
CHECKOV = ROOT / ".tools" / "checkov-venv" / "bin" / "checkov"
# Every backend, the push, and the one opt-in that leaves "restricted" (rendered as release `ownership`).
CASES = {
    "job": merge({"gpus": 16}, RWX, PUSH_JOB),
    "jobset": merge({"backend": "jobset", "gpus": 16}, RWX, PUSH_JOB),
    "pytorchjob": merge({"backend": "pytorchjob", "gpus": 16}, RWX, PUSH_JOB),
    "trainjob": merge({"backend": "trainjob", "gpus": 16}, RWX, PUSH_JOB),
    "ownership": {"storage": {"fixOwnership": True}},
}


def as_checkov_input(docs: list[dict], release: str) -> list[dict]:
    """checkov knows Jobs, not JobSets or Kubeflow kinds: the pod templates of a JobSet, PyTorchJob or
    TrainingRuntime go in as the Jobs their controllers create. A TrainJob on the stock runtime only patches part of a
    pod (the rest is the runtime's), so it is left out."""
    out = []
    for doc in docs:
        if doc["kind"] == "TrainJob":
            continue
        if doc["apiVersion"].startswith(("kubeflow.org/", "trainer.kubeflow.org/", "jobset.x-k8s.io/")):
            for where, template in pod_templates(doc):
                name = re.sub(r"[^a-z0-9-]", "-", f"{release}-{where.lower()}")
                out.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                            "spec": {"template": template}})
        else:
            out.append(doc)
    return out


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> set[tuple[str, str]]:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run `make checkov` (`make test` does)")
    folder = tmp_path_factory.mktemp("audit")
    for name, values in CASES.items():
        docs = render(values)
        if name == "ownership":  # a distinct release name, so its exception cannot cover the other renders
            docs = json.loads(json.dumps(docs).replace('"ddpm-', '"ownership-ddpm-'))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump_all(as_checkov_input(docs, name)))
    shutil.copy(ROOT / "Dockerfile", folder / "Dockerfile")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run([str(CHECKOV), "-d", str(folder), "--framework", "kubernetes", "dockerfile",
                             "--quiet", "--compact", "--skip-download", "-o", "json"],
                            capture_output=True, text=True, timeout=300, env=env)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, result.stderr[-2000:]
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0 and report["summary"]["passed"] > 0
    return {(f["check_id"], f["resource"]) for r in reports for f in r["results"]["failed_checks"]}


def exceptions() -> list[dict]:
    entries = yaml.safe_load(EXCEPTIONS.read_text())
    for entry in entries:
        assert set(entry) == {"check", "resource", "reason"} and len(entry["reason"].split()) >= 8, entry
    return entries


def test_every_checkov_finding_is_fixed_or_explained(findings):
    entries = exceptions()
    unexplained = sorted(f"{check} {resource}" for check, resource in findings
                         if not any(e["check"] == check and re.search(e["resource"], resource) for e in entries))
    assert not unexplained, "checkov findings to fix or explain in helm/checkov-exceptions.yaml:\n" + "\n".join(unexplained)


def test_no_stale_exception(findings):
    stale = [e["check"] for e in exceptions()
             if not any(check == e["check"] and re.search(e["resource"], resource) for check, resource in findings)]
    assert not stale, f"exceptions that match no finding any more (remove them): {stale}"


def test_the_restricted_defaults_pass_checkov(findings):
    """The checks the chart is built to pass: no privilege, no root, no host namespaces, read-only root, seccomp."""
    must_pass = {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_37", "CKV_K8S_31",
                 "CKV_K8S_13", "CKV_K8S_10", "CKV_K8S_12", "CKV_K8S_17", "CKV_K8S_18", "CKV_K8S_19"}
    failed = {check for check, resource in findings if ".ownership-" not in resource}
    assert not must_pass & failed, sorted(must_pass & failed)
