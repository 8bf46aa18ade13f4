"""The push of the trained pipeline to the Hub: by rank 0 at the end of training (default), or by the separate push
Job that waits for this run (push.mode=job), with its deadlines.
"""

from __future__ import annotations

import pytest
import yaml

from chart import (
    BACKENDS, PUSH_JOB, PUSH_ON, RELEASE, RWX, api_access_of, by_kind, env_of, merge, one, render, render_error,
)


@pytest.mark.parametrize("backend,kind,group,resource", [
    ("job", "Job", "batch", "jobs"), ("jobset", "JobSet", "jobset.x-k8s.io", "jobsets"),
    ("pytorchjob", "PyTorchJob", "kubeflow.org", "pytorchjobs"), ("trainjob", "TrainJob", "trainer.kubeflow.org", "trainjobs")])
def test_push_job_waits_for_this_run_with_deadlines(backend, kind, group, resource):
    docs = render(merge(PUSH_JOB, RWX, {"backend": backend}))
    push = one(docs, "Job", "push")
    assert not push["metadata"].get("annotations", {}).get("helm.sh/hook"), "a hook would block helm install"
    assert push["spec"]["activeDeadlineSeconds"] == 1209600 + 3600 + 600
    pod = push["spec"]["template"]["spec"]
    wait, = pod["initContainers"]
    assert wait["command"] == ["ddpm", "wait-for-training", "--workload", f"{kind}/{RELEASE}-train",
                               "--poll-seconds", "30", "--timeout-seconds", "1209600"]
    assert env_of(wait)["DDPM_CONFIG_FILE"] == "/etc/ddpm/config.yaml"
    assert env_of(wait)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}, "a misspelt Secret fails at once"
    assert {m["mountPath"]: m.get("readOnly", False) for m in wait["volumeMounts"]}["/data"] is True
    container, = pod["containers"]
    assert container["command"] == ["ddpm", "push", "--deadline-seconds", "3600"]
    assert env_of(container)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    # It follows only its own workload's state: get, then watch (trainer/wait.py), through a token of its own.
    assert pod["serviceAccountName"] == f"{RELEASE}-push" and pod["automountServiceAccountToken"] is False
    assert api_access_of(pod, wait) and not api_access_of(pod, container), "the upload gets no API token"
    role = one(docs, "Role", "push")
    assert role["rules"] == [{"apiGroups": [group], "resources": [resource], "resourceNames": [f"{RELEASE}-train"],
                              "verbs": ["get", "watch"]}]
    binding = one(docs, "RoleBinding", "push")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == f"{RELEASE}-push"


def test_push_deadlines_are_values():
    docs = render(merge(PUSH_JOB, RWX, {"push": {"pollSeconds": 5, "waitTimeoutSeconds": 7200, "deadlineSeconds": 900,
                                                 "activeDeadlineSeconds": 9000, "serviceAccountName": "pusher"}}))
    push = one(docs, "Job", "push")
    assert push["spec"]["activeDeadlineSeconds"] == 9000
    pod = push["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["command"][-4:] == ["--poll-seconds", "5", "--timeout-seconds", "7200"]
    assert pod["containers"][0]["command"][-1] == "900"
    assert pod["serviceAccountName"] == "pusher" and not [r for r in by_kind(docs, "Role")
                                                          if r["metadata"]["labels"]["app.kubernetes.io/component"] == "push"], \
        "the user's account, no RBAC"
    assert "push.activeDeadlineSeconds=100 must be larger" in render_error(
        merge(PUSH_JOB, RWX, {"push": {"activeDeadlineSeconds": 100}}))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_by_default_rank_0_pushes_at_the_end_of_training(backend):
    """push.mode=trainer: the trainer's config asks for the push (push_to_hub), the training container gets the
    token from the Secret, and nothing else is created for it: no push Job, ServiceAccount or Role."""
    docs = render(merge(PUSH_ON, {"backend": backend}))
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["push_to_hub"] is True and config["hub_model_id"] == "me/ddpm-butterflies"
    assert not [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "push"]
    assert "push_to_hub" not in yaml.safe_load(one(render({"backend": backend}), "ConfigMap")["data"]["config.yaml"])
