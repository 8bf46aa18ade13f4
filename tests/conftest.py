import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Under pytest-xdist (make test), each worker and the training processes it starts share the CPUs: with OpenMP's
# default of one thread per core, N workers run N x cores spinning threads and slow each other down far more than
# they overlap. Give each worker its share (set before torch is imported here or in any child).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

REPO = Path(__file__).resolve().parents[1]

# A run small enough for a few seconds on CPU: 16 px, ~3M-parameter UNet, short DDIM grids.
TINY = [
    "--model_preset", "small", "--image_size", "16", "--train_batch_size", "4", "--builtin_num_images", "32",
    "--eval_batch_size", "4", "--num_inference_steps", "2", "--lr_warmup_steps", "2", "--dataloader_num_workers", "0",
]


def clean_env(**extra) -> dict:
    """The test process env without DDPM_* variables (a stray one would be rejected as unknown), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def ddpm(*args, env=None, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m trainer`) as a subprocess; stdout is a pipe, so not a TTY."""
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)], capture_output=True, text=True,
        env=env or clean_env(), cwd=kwargs.pop("cwd", REPO), **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ddpm {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


# ---- the real test cluster (tests/cluster): once per test run --------------------------------------------------------
# `make test` runs pytest-xdist with --dist loadgroup: every test file is its own group (as --dist loadfile would do, so
# module fixtures are built once), except the files that use the cluster, which form one group, "cluster": they all
# run on one worker, which starts the control plane once for all of them.
CLUSTER_GROUP = "cluster"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # The cluster group first: it is the longest unit by far, so one worker starts it at once while the other takes
    # everything else (xdist hands out groups in collection order); last, it would end the run alone.
    items.sort(key=lambda item: item.get_closest_marker("xdist_group").args[0] != CLUSTER_GROUP)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The test cluster: a real control plane built from Kubernetes' Go modules, process-run nodes and volumes
    (tests/cluster/__init__.py). Needs KUBE_TEST_ASSETS (make test sets it)."""
    from cluster import Cluster

    started = Cluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    """A real kube-apiserver and its etcd, without controllers or nodes (tests/cluster/apiserver.py), started once per
    worker for the unit tests of the code's API calls; tests/kube_proxy.py stands in front of it."""
    from cluster.apiserver import ApiServer
    from cluster.controlplane import assets_dir
    from kube_proxy import TOKEN

    server = ApiServer(tmp_path_factory.mktemp("apiserver"), assets_dir(), (TOKEN,)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_namespace(cluster):
    """Namespaces for one test on the cluster, deleted (their pods gone, their GPUs free) when it ends."""
    from cluster.testing import delete_namespace, namespace

    made = []

    def make(prefix: str, pod_security: str | None = "restricted") -> str:
        made.append(namespace(cluster, prefix, pod_security))
        return made[-1]

    yield make
    for name in made:
        delete_namespace(cluster, name)


@pytest.fixture
def hub(cluster):
    """The fake Hub (tests/fake_hub.py) listening in the cluster's network, where pods reach it at the node's
    address."""
    from cluster.network import NODE_IP
    from cluster.testing import TOKEN
    from fake_hub import FakeHub

    server = cluster.network.call(lambda: FakeHub(tokens=(TOKEN,), host="0.0.0.0", advertise=NODE_IP).start())
    yield server
    server.stop()
