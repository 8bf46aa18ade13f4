"""backend=jobset on the real control plane with the JobSet controller and webhooks built from sigs.k8s.io/jobset
v0.10.1 (the chart's floor; v0.10.0 itself is not served by the module proxy), started from the build's manifest
(tests/cluster/operators.py). Pods run as in tests/test_cluster_job.py."""

from __future__ import annotations

import datetime as dt

import pytest

from cluster.testing import (Release, ddpm_status, evict_paused, marker, paused, resumed, status_ranks, values,
                             wait_for)
from conftest import CLUSTER_GROUP

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(CLUSTER_GROUP)]

JOBSETS = "apis/jobset.x-k8s.io/v1alpha2/jobsets"


@pytest.fixture
def jobset(cluster):
    return cluster.operators.ensure("jobset")


def stamp(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_the_leader_starts_first_the_gang_survives_a_preemption_uncounted_and_completes(cluster, make_namespace,
                                                                                        jobset):
    """Issue 19 point 3 (`startupPolicy`) and issue 18 point 4: the JobSet controller creates the workers only once
    the leader, node 0, is Ready, i.e. its rendezvous store answers. Evicting a worker mid-run (Eviction API) makes the
    Job fail through its podFailurePolicy; the JobSet's rule `Preempted` recreates the whole gang without counting it
    (status.restartsCountTowardsMax stays 0, failurePolicy.maxRestarts is backoffLimitPerNode, not x nodes), the run
    resumes from its checkpoint and the JobSet completes at the same final step."""
    ns = make_namespace("jobset")
    release = Release(cluster, "ddpm", ns, values(backend="jobset", config={"max_train_steps": 40}))
    release.install()
    leader = wait_for("the leader's pod Ready", lambda: [
        p for p in release.pods() if p["metadata"]["labels"].get("jobset.sigs.k8s.io/replicatedjob-name") == "leader"
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])],
        180, release.describe)[0]
    became_ready = next(c["lastTransitionTime"] for c in leader["status"]["conditions"] if c["type"] == "Ready")
    worker = wait_for("the worker's pod", lambda: [
        p for p in release.pods() if p["metadata"]["labels"].get("jobset.sigs.k8s.io/replicatedjob-name")
        == "workers"], 120, release.describe)[0]
    assert stamp(worker["metadata"]["creationTimestamp"]) >= stamp(became_ready), (
        "the worker was created before the leader was Ready")
    spec = release.get(JOBSETS, release.workload)["spec"]
    assert spec["failurePolicy"]["maxRestarts"] == 6

    wait_for("a checkpoint", lambda: release.newest_checkpoint() > 0, 300, release.describe)
    with paused(cluster, release, 40):  # mid-run however fast this machine trains
        running = next(p for p in release.pods() if p["status"].get("phase") == "Running"
                       and p["metadata"]["labels"].get("jobset.sigs.k8s.io/replicatedjob-name") == "workers")
        # Issue 19 point 12's kind for the JobSet: node 0 is the leader's pod, worker i is node rank i + 1.
        shown = status_ranks(ddpm_status(cluster, ns))
        assert shown == {leader["metadata"]["name"]: "0", running["metadata"]["name"]: "1"}, shown
        evict_paused(cluster, release, running["metadata"]["name"])

    done = release.wait_condition(JOBSETS, release.workload, ("Completed", "Failed"), 600)
    status = release.get(JOBSETS, release.workload)["status"]
    assert done["type"] == "Completed", release.describe()
    assert status.get("restarts", 0) >= 1 and status.get("restartsCountTowardsMax", 0) == 0, status
    assert resumed(release), release.describe()
    assert marker(release)["global_step"] == 40
