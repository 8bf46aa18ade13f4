"""Security of the rendered pods: the Pod Security "restricted" profile with a read-only root, no credential in
values, ConfigMaps or env literals, the Hub token only where the push runs, and RBAC exactly the calls the code makes
(trainer/kube.py), with an API token only in the containers that call the API.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from trainer.rbac import role_rules, trainer_calls, wait_calls

from chart import (
    BACKENDS, CHART, MATRIX, PUSH_JOB, PUSH_ON, RELEASE, RWX, api_access_of, by_kind, env_of,
    full_pod_templates, merge, one, pod_templates, render, render_error, run_helm, training_pods, values_args,
)


def test_ownership_fix_is_opt_in_and_the_only_non_restricted_container():
    assert not [c for _, t in training_pods(render()) for c in t["spec"].get("initContainers", [])
                if c["name"] == "fix-ownership"]
    for backend in BACKENDS:
        docs = render({"backend": backend, "storage": {"fixOwnership": True}})
        for where, template in training_pods(docs):
            init = template["spec"]["initContainers"][0]
            assert init["name"] == "fix-ownership"
            assert init["securityContext"]["runAsUser"] == 0
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER", "DAC_OVERRIDE"]}
            assert init["command"][-1] == f"/data/{RELEASE}" and "chown 1000:1000" in init["command"][2]
            problems = restricted_problems(where, template["spec"])
            assert problems and all("fix-ownership" in p for p in problems), problems
    assert "storage.fixOwnership" in render_error({"backend": "trainjob", "storage": {"fixOwnership": True},
                                                   "kubeflow": {"trainingRuntime": {"create": False}}})


ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_problems(where: str, spec: dict) -> list[str]:
    """The Pod Security Standard "restricted" profile (v1.37), checked on one pod spec."""
    problems = []
    pod_sc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            problems.append(f"{where}: {key}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"{where}: volume {volume['name']} of type {kinds - ALLOWED_VOLUMES}")
    if pod_sc.get("runAsUser") == 0:
        problems.append(f"{where}: pod runAsUser 0")
    containers = spec.get("containers", []) + spec.get("initContainers", [])
    if not containers:
        problems.append(f"{where}: no containers")
    for c in containers:
        sc = c.get("securityContext", {})
        name = f"{where}/{c['name']}"
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_pod_meets_restricted_with_a_read_only_root(case):
    docs = render(MATRIX[case])
    pods = full_pod_templates(docs)
    assert len(pods) >= 2
    problems = [p for where, t in pods for p in restricted_problems(where, t["spec"])]
    trainer_env = {k: v for d in by_kind(docs, "TrainJob") for k, v in env_of(d["spec"]["trainer"]).items()}
    for where, template in pods:
        spec = template["spec"]
        if "fsGroup" not in spec.get("securityContext", {}) and not where.startswith("Pod/"):
            problems.append(f"{where}: no fsGroup, the volume would not be writable")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: the default API token is mounted (only explicit projected tokens)")
        mounts_by_volume = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            if c["name"] == "warm-cache":  # the user's own init container (BUSY)
                continue
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}/{c['name']}: writable root filesystem")
            writable = {m["mountPath"] for m in c.get("volumeMounts", [])
                        if "emptyDir" in mounts_by_volume.get(m["name"], {})}
            home = {**(trainer_env if where.startswith("TrainingRuntime/") else {}), **env_of(c)}.get("HOME")
            if c["name"] != "wget" and not ({"/tmp", home} <= writable):
                problems.append(f"{where}/{c['name']}: /tmp and HOME={home} must be writable emptyDirs")
    assert not problems, "\n".join(problems)


def test_restricted_check_catches_a_weak_pod():
    spec = one(render(), "Job", "train")["spec"]["template"]["spec"]
    spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_problems("Job", spec)) == 2


def test_security_context_overrides_openshift_and_rdma():
    """OpenShift assigns the uid (drop ours); RDMA needs IPC_LOCK (then the namespace needs "baseline")."""
    docs = render({"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
                   "containerSecurityContext": {"capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}})
    for where, template in full_pod_templates(docs):
        pod_sc = template["spec"]["securityContext"]
        assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(pod_sc) and pod_sc["runAsNonRoot"] is True, where
    container = one(docs, "Job", "train")["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True, "the other defaults stay"


TOKEN_LIKE = re.compile(r"(?i)(token|secret|password|api_?key)")


@pytest.mark.parametrize("case", sorted(c for c in MATRIX if "pushOn" in c))
def test_no_secret_in_config_maps_or_env_literals(case):
    docs = render(MATRIX[case])
    assert not by_kind(docs, "Secret"), "the chart must not create Secrets; the token Secret already exists"
    for cm in by_kind(docs, "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert not re.search(r"hf_[A-Za-z0-9]{10,}", value), f"token-like string in ConfigMap {key}"
            assert not TOKEN_LIKE.search(value), f"ConfigMap {cm['metadata']['name']}/{key} mentions a credential"
    for doc in docs:
        for where, template in pod_templates(doc):
            spec = template["spec"]
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                for e in c.get("env", []):
                    if TOKEN_LIKE.search(e["name"]):
                        assert "value" not in e, f"{where}/{c['name']}: {e['name']} is a literal"
                        assert "secretKeyRef" in e["valueFrom"], f"{where}/{c['name']}: {e['name']} not from a Secret"
        if doc["kind"] == "TrainJob":
            for e in doc["spec"]["trainer"].get("env", []):
                assert not (TOKEN_LIKE.search(e["name"]) and "value" in e)


@pytest.mark.parametrize("values", [
    {"push": {"token": "hf_leak"}},
    {"config": {"hub_token": "hf_leak"}},
    {"extraEnv": [{"name": "HF_TOKEN", "value": "hf_leak"}]},
])
def test_a_token_cannot_be_given_as_a_value(values):
    assert "hf_leak" not in "".join(json.dumps(d) for d in _try_render(values))


def _try_render(values: dict) -> list[dict]:
    result = run_helm("template", RELEASE, str(CHART), *values_args(values))
    return [] if result.returncode else [d for d in yaml.safe_load_all(result.stdout) if d]


def token_holders(docs: list[dict]) -> list[str]:
    holders = [f"{where}/{c['name']}" for doc in docs for where, t in pod_templates(doc)
               for c in t["spec"].get("containers", []) + t["spec"].get("initContainers", []) if "HF_TOKEN" in env_of(c)]
    return sorted(holders + [f"TrainJob/{d['metadata']['name']}" for d in by_kind(docs, "TrainJob")
                             if "HF_TOKEN" in env_of(d["spec"]["trainer"])])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_the_hub_token_reaches_only_the_container_that_pushes(backend):
    """push.mode=job: the push container and its wait-for-training init container (which references it so a
    misspelt Secret fails at once), never the training pods. push.mode=trainer: rank 0 pushes, so the training
    container (every rank's: one pod template), and not TensorBoard."""
    assert token_holders(render(merge(PUSH_JOB, RWX, {"backend": backend}))) == [
        f"Job/{RELEASE}-push/push", f"Job/{RELEASE}-push/wait-for-training"]
    by_trainer = token_holders(render(merge(PUSH_ON, {"backend": backend})))
    assert by_trainer == {"job": [f"Job/{RELEASE}-train/trainer"], "jobset": ["JobSet/leader/trainer"],
                          "pytorchjob": ["PyTorchJob/Worker/pytorch"], "trainjob": [f"TrainJob/{RELEASE}-train"]}[backend]
    assert token_holders(render({"backend": backend})) == []


@pytest.mark.parametrize("backend,kind", sorted(BACKENDS.items()))
def test_trainer_role_is_exactly_what_the_code_calls(backend, kind):
    docs = render({"backend": backend})
    role = one(docs, "Role", "train")
    # The training pods never read or watch the workload: only the push Job's wait-for-training does (its own Role).
    assert role["rules"] == role_rules(trainer_calls(kind))
    binding = one(docs, "RoleBinding", "train")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": RELEASE, "namespace": "default"}]
    # the TrainingRuntime's container gets its env from the TrainJob's spec.trainer.env
    trainer_env = env_of(one(docs, "TrainJob")["spec"]["trainer"]) if backend == "trainjob" else {}
    for where, template in training_pods(docs):
        pod = template["spec"]
        assert pod["serviceAccountName"] == RELEASE and pod["automountServiceAccountToken"] is False, where
        assert api_access_of(pod, pod["containers"][0], trainer_env) == "/var/run/secrets/ddpm-trainer/kube-api", where
        assert all(api_access_of(pod, c) is None for c in pod.get("initContainers", [])), where


@pytest.mark.parametrize("backend,kind", sorted(BACKENDS.items()))
def test_push_role_is_exactly_what_wait_for_training_calls(backend, kind):
    """trainer/wait.py reads the workload (get) and watches it (watch): wait_calls, narrowed to the one workload."""
    docs = render(merge(PUSH_JOB, RWX, {"backend": backend}))
    [rule] = one(docs, "Role", "push")["rules"]
    assert [rule] == [r | {"resourceNames": [f"{RELEASE}-train"]} for r in role_rules(wait_calls(kind))]
    assert rule["verbs"] == ["get", "watch"]


@pytest.mark.parametrize("values", [PUSH_ON, merge(PUSH_JOB, RWX)], ids=["sidecar", "own-pods"])
def test_no_token_where_the_api_is_not_used(values):
    """Only the trainer container and the push's wait call the API: not TensorBoard (sidecar or Deployment), not
    the upload, not the test pod."""
    for where, template in full_pod_templates(render(values)):
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, where
        users = [c["name"] for c in pod["containers"] + pod.get("initContainers", []) if api_access_of(pod, c)]
        assert users == {f"Job/{RELEASE}-train": ["trainer"], f"Job/{RELEASE}-push": ["wait-for-training"]}.get(where, []), where


def test_without_rbac_training_is_unchanged_and_events_are_best_effort():
    """rbac.create=false: no Role or RoleBinding; the pods are the same (trainer/events.py turns events off after
    the first 403 and training goes on; tests/test_events.py)."""
    values = merge(PUSH_JOB, RWX)
    docs = render(merge(values, {"rbac": {"create": False}}))
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    assert sorted(d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")) == [RELEASE, f"{RELEASE}-push"]
    assert one(docs, "Job", "train")["spec"] == one(render(values), "Job", "train")["spec"]
