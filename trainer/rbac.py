"""Every Kubernetes API call the trainer makes, as RBAC sees it: (API group, resource) -> verbs, per pod identity.

The chart's Roles are rendered from this table (tests/test_chart_security.py compares them), tests/test_kube.py checks
that the code calls exactly what it declares, and the real authorizer of tests/test_cluster_job.py refuses anything
the Roles leave out. The calls themselves are trainer.kube.
"""

from __future__ import annotations

from trainer.kube import CHART_WORKLOAD_KINDS, EVENT, OWNERS_BELOW, POD, WORKLOAD_KINDS

Calls = dict[tuple[str, str], frozenset[str]]


def _merge(*parts: Calls) -> Calls:
    merged: dict[tuple[str, str], frozenset[str]] = {}
    for part in parts:
        for key, verbs in part.items():
            merged[key] = merged.get(key, frozenset()) | verbs
    return merged


def trainer_calls(workload_kind: str) -> Calls:
    """What the training pods call, for a backend whose workload is `workload_kind`: rank 0 creates Events (and
    patches one to count a repeat), reads its own pod, and reads the owners between the pod and the workload
    (resolve_workload). It never reads or watches the workload itself: TRAINING_WORKLOAD names it (the chart sets
    it on every training pod), and resolve_workload stops at the ownerReference that matches it."""
    return _merge({(EVENT.group, EVENT.plural): frozenset({"create", "patch"}),
                   (POD.group, POD.plural): frozenset({"get"})},
                  *({(k.group, k.plural): frozenset({"get"})} for k in OWNERS_BELOW[workload_kind]))


def wait_calls(workload_kind: str) -> Calls:
    """What `ddpm wait-for-training` (the push Job's init container, trainer/wait.py) calls: it reads the workload and
    watches it (the collection filtered by metadata.name)."""
    kind = WORKLOAD_KINDS[workload_kind]
    return {(kind.group, kind.plural): frozenset({"get", "watch"})}


def role_rules(calls: Calls) -> list[dict]:
    """`calls` (trainer_calls, wait_calls) as the `rules` of an rbac.authorization.k8s.io/v1 Role: one rule per
    resource, sorted. Each pod's service account gets a Role of exactly its own calls."""
    return [{"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
            for (group, resource), verbs in sorted(calls.items())]


# `ddpm status` runs with the user's own kubeconfig rights: it lists the chart's workload kinds, pods and Events.
STATUS_CALLS: Calls = _merge({(EVENT.group, EVENT.plural): frozenset({"list"}),
                              (POD.group, POD.plural): frozenset({"list"})},
                             *({(k.group, k.plural): frozenset({"list"})} for k in CHART_WORKLOAD_KINDS))
API_CALLS: Calls = _merge(*(trainer_calls(kind) for kind in WORKLOAD_KINDS),
                          *(wait_calls(kind) for kind in WORKLOAD_KINDS), STATUS_CALLS)
