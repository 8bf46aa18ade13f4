"""Every object the chart renders, for every case of the matrix, against the strict Kubernetes JSON schemas of every
minor in the chart's kubeVersion range (kubernetes-validate), and the Kubeflow and JobSet objects against their SDKs'
models (kubeflow-training's PyTorchJob, kubeflow-trainer-api's TrainJob, TrainingRuntime and JobSet): what a misspelt
or mistyped field would otherwise only show on some cluster version. Offline; no cluster.
"""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest

from chart import KUBERNETES_VERSIONS, MATRIX, case_values, kubernetes_problems, one, render, validate_kubernetes


def test_kubernetes_versions_cover_the_chart_range():
    minors = [int(v.split(".")[1]) for v in KUBERNETES_VERSIONS]
    assert minors[0] == 31 and minors == list(range(31, minors[-1] + 1)) and minors[-1] >= 37, KUBERNETES_VERSIONS


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_object_validates_strictly_on_every_minor(case):
    docs = render(MATRIX[case])
    problems = [p for version in KUBERNETES_VERSIONS for p in kubernetes_problems(docs, version)]
    assert not problems, "\n".join(problems)
    for doc in docs:  # the Kubeflow objects against their SDKs' models, too
        if doc["kind"] == "PyTorchJob":
            check_pytorchjob(doc)
        elif doc["kind"] == "TrainJob":
            check_trainjob(doc)
        elif doc["kind"] == "TrainingRuntime":
            check_training_runtime(doc)
        elif doc["kind"] == "JobSet":
            check_jobset(doc)


def test_strict_kubernetes_validation_catches_a_misspelt_field():
    job = one(render(), "Job", "train")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(job, KUBERNETES_VERSIONS[0])


def test_pod_failure_policy_validates_on_the_oldest_minor_only_with_a_condition_status():
    """1.31-1.34 require `status` in onPodConditions; the chart sets it (the issue's 1.31 failure)."""
    job = one(render(), "Job", "train")
    del job["spec"]["podFailurePolicy"]["rules"][2]["onPodConditions"][0]["status"]
    with pytest.raises(kubernetes_validate.ValidationError, match="status"):
        validate_kubernetes(job, "1.31.0")


def _leaves(node, path=()):
    """(path, value) of every scalar; numbers canonicalised, since SDKs turn quantities 8 into "8" or "8.0"."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, (*path, index))
    else:
        text = str(node)
        try:
            text = repr(float(text)) if not isinstance(node, bool) else text
        except ValueError:
            pass
        yield path, text


def assert_round_trip(original: dict, back: dict, model: str) -> None:
    """The models ignore keys they do not know; a key lost in the round trip is a field the model lacks."""
    lost = set(_leaves(original)) - set(_leaves(back))
    added = set(_leaves(back)) - set(_leaves(original))
    assert not lost and not added, (
        f"{model} does not round-trip: unknown or mistyped fields {sorted(lost)}; changed {sorted(added)}"
    )


def check_pytorchjob(doc: dict) -> None:
    """kubeflow-training's OpenAPI client: deserialise as the SDK does for API responses, serialise back."""
    from kubeflow.training import ApiClient

    client = ApiClient()

    class Response:
        data = json.dumps(doc)

    job = client.deserialize(Response, "KubeflowOrgV1PyTorchJob")  # raises ValueError on a missing required field
    assert type(job).__name__ == "KubeflowOrgV1PyTorchJob"
    assert_round_trip(doc, client.sanitize_for_serialization(job), "KubeflowOrgV1PyTorchJob")


def check_trainjob(doc: dict) -> None:
    """kubeflow-trainer-api's pydantic models: from_dict validates types (StrictInt, StrictStr...), to_dict back."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    job = TrainerV1alpha1TrainJob.from_dict(doc)  # raises pydantic.ValidationError on a wrong type
    assert_round_trip(doc, job.to_dict(), "TrainerV1alpha1TrainJob")


def check_training_runtime(doc: dict) -> None:
    """The TrainingRuntime, JobSet template (JobsetV1alpha2*) included, against kubeflow-trainer-api's models."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainingRuntime

    runtime = TrainerV1alpha1TrainingRuntime.from_dict(doc)
    assert_round_trip(doc, runtime.to_dict(), "TrainerV1alpha1TrainingRuntime")


def check_jobset(doc: dict) -> None:
    """The JobSet against kubeflow-trainer-api's JobsetV1alpha2JobSet (the JobSet API the Trainer ships)."""
    from kubeflow_trainer_api.models import JobsetV1alpha2JobSet

    jobset = JobsetV1alpha2JobSet.from_dict(doc)
    assert_round_trip(doc, jobset.to_dict(), "JobsetV1alpha2JobSet")


def test_kubeflow_checks_catch_a_misspelt_field():
    pytorchjob = one(render(case_values("pytorchjob", 16, False, False)), "PyTorchJob")
    bad = copy.deepcopy(pytorchjob)
    bad["spec"]["nprocsPerNode"] = bad["spec"].pop("nprocPerNode")
    with pytest.raises(AssertionError, match="nprocsPerNode"):
        check_pytorchjob(bad)
    bad = copy.deepcopy(pytorchjob)
    bad["spec"]["elasticPolicy"]["rdzvEndpoint"] = "x:1"
    with pytest.raises(AssertionError, match="rdzvEndpoint"):
        check_pytorchjob(bad)

    docs = render(case_values("trainjob", 16, False, False))
    bad = one(docs, "TrainJob")
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    with pytest.raises(AssertionError, match="numNode"):
        check_trainjob(bad)
    bad = one(docs, "TrainJob")
    bad["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(Exception, match="numNodes|num_nodes"):
        check_trainjob(bad)
    bad = one(docs, "TrainingRuntime")
    bad["spec"]["template"]["spec"]["failurePolicy"]["maxRestart"] = 1
    with pytest.raises(AssertionError, match="maxRestart"):
        check_training_runtime(bad)


def test_jobset_model_catches_a_misspelt_field():
    bad = one(render({"backend": "jobset"}), "JobSet")
    bad["spec"]["failurePolicy"]["rules"][0]["onJobFailureMessagePattern"] = ["x"]
    with pytest.raises(AssertionError, match="onJobFailureMessagePattern"):
        check_jobset(bad)
