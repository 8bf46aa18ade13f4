"""`ddpm launch`, the image's entrypoint (issue 9 section 8): arguments pass through unchanged, the pod's environment
is validated (exit 2 naming the variable), and the workers' exit codes come through torchrun."""

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, TINY, clean_env
from helpers import free_port
from trainer import cli, launch
from trainer.errors import (EXIT_CONFIG, EXIT_DIVERGED, EXIT_FAILED, EXIT_PREEMPTED, EXIT_STALLED, LaunchError,
                            Outcome, exit_code)

ENV = {"PET_NPROC_PER_NODE": "1"}


def argv(environ, args=()):
    return launch.torchrun_argv(environ, 90, list(args), has_cuda=False)


@pytest.mark.parametrize("given", [["--max_train_steps", "6"], ["--", "--max_train_steps", "6"]])
def test_arguments_reach_ddpm_train_unchanged(monkeypatch, given):
    seen = {}
    monkeypatch.setattr(launch, "launch",
                        lambda train_args, grace: seen.setdefault("args", train_args) and Outcome.OK)
    assert cli.run_command(["launch", *given]) == Outcome.OK
    assert seen["args"] == ["--max_train_steps", "6"]


def test_a_bad_config_fails_before_torchrun(monkeypatch):
    monkeypatch.setattr(launch, "launch", lambda *a: pytest.fail("torchrun must not start"))
    with pytest.raises(Exception) as caught:
        cli.run_command(["launch", "--image_sise", "32"])
    assert caught.value.exit_code == EXIT_CONFIG and "did you mean 'image_size'" in str(caught.value)


def test_static_single_node_and_indexed_job_argv():
    assert argv({}, ["--seed", "1"]) == [
        "--nnodes=1", "--nproc_per_node=1", "--max_restarts=0", "--shutdown_timeout=105", "--node_rank=0",
        "--master_addr=127.0.0.1", "--master_port=29500", "-m", "trainer", "train", "--seed", "1"]
    two = argv({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "JOB_COMPLETION_INDEX": "1",
                "PET_MASTER_ADDR": "ddpm-train-0.ddpm-workers", "PET_MASTER_PORT": "29400"})
    assert {"--nnodes=2", "--nproc_per_node=8", "--node_rank=1", "--master_addr=ddpm-train-0.ddpm-workers",
            "--master_port=29400"} <= set(two)


def test_c10d_rendezvous_argv_node_zero_hosts_the_store():
    env = {"PET_NNODES": "2:4", "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "ddpm-train-0.ddpm-workers:29500",
           "PET_RDZV_ID": "ddpm", "PET_RDZV_CONF": "join_timeout=1800", "PET_MAX_RESTARTS": "3"}
    zero = argv({**env, "JOB_COMPLETION_INDEX": "0"})
    assert {"--nnodes=2:4", "--max_restarts=3", "--rdzv_backend=c10d", "--rdzv_id=ddpm",
            "--rdzv_endpoint=ddpm-train-0.ddpm-workers:29500",
            "--rdzv_conf=join_timeout=1800,read_timeout=1800,is_host=true"} <= set(zero)
    assert not any(a.startswith(("--master_addr", "--node_rank")) for a in zero)
    assert "--rdzv_conf=join_timeout=1800,read_timeout=1800,is_host=false" in argv({**env, "JOB_COMPLETION_INDEX": "2"})


@pytest.mark.parametrize("conf, expected", [
    ("join_timeout=1800", "join_timeout=1800,read_timeout=1800"),  # the chart's, and a PyTorchJob's rdzvConf
    ("", "read_timeout=600"),  # torch's join_timeout default (dynamic_rendezvous.py RendezvousTimeout)
    ("join_timeout=20", "join_timeout=20,read_timeout=60"),  # never below torch's own read_timeout default
    ("join_timeout=1800,read_timeout=90", "join_timeout=1800,read_timeout=90"),  # set on purpose: kept
])
def test_the_store_connection_waits_as_long_as_the_rendezvous(conf, expected):
    """torch connects to node 0's rendezvous store with read_timeout as the TCPStore timeout (60 s by default,
    c10d_rendezvous_backend.py _create_tcp_store): a pod whose node 0 starts later than that failed before
    join_timeout began to count. Whoever wrote PET_RDZV_CONF (the chart, the training operator), the connection now
    waits as long as the rendezvous does."""
    env = {"PET_NNODES": "2", "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "node-0:29500",
           "PET_RDZV_CONF": conf}
    assert f"--rdzv_conf={expected}" in argv(env)


@pytest.mark.parametrize("environ,named", [
    ({"PET_NNODES": "two"}, "PET_NNODES='two'"),
    ({"PET_NNODES": "4:2"}, "PET_NNODES='4:2'"),
    ({"PET_NPROC_PER_NODE": "0"}, "PET_NPROC_PER_NODE='0'"),
    ({"JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX='x' is not a whole number"),
    ({"JOB_COMPLETION_INDEX": "-1"}, "JOB_COMPLETION_INDEX='-1' must be at least 0"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "a"}, "PET_NODE_RANK=2 but there are 2 node(s)"),
    ({"JOB_COMPLETION_INDEX": "1"}, "JOB_COMPLETION_INDEX=1 but there are 1 node(s) (PET_NNODES is not set"),
    ({"PET_MASTER_PORT": "70000"}, "PET_MASTER_PORT='70000' must be between 1 and 65535"),
    ({"PET_NNODES": "2"}, "PET_NNODES=2 but PET_MASTER_ADDR is not set"),
    ({"PET_NNODES": "1:2"}, "needs a dynamic rendezvous"),
    ({"PET_RDZV_BACKEND": "etcd"}, "PET_RDZV_BACKEND='etcd' is not supported"),
    ({"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "node0"}, "PET_RDZV_ENDPOINT='node0' must be HOST:PORT"),
    ({"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "a:1", "PET_RDZV_CONF": "join_timeout=soon"},
     "join_timeout='soon' must be a number of seconds"),
    ({"PET_MAX_RESTARTS": "-3"}, "PET_MAX_RESTARTS='-3' must be at least 0"),
    ({"PET_NPROC_PER_NODE": "²"}, "PET_NPROC_PER_NODE='²' must be a process count"),  # str.isdigit() says yes
    ({"PET_NPROC_PER_NODE": "gpu"}, "PET_NPROC_PER_NODE='gpu' but this node has no CUDA GPU"),
    ({"PET_MASTER_PORT": "٣٠٠٠"}, "PET_MASTER_PORT='٣٠٠٠' is not a whole number"),  # int() reads Arabic digits
])
def test_nonsense_environment_is_exit_2_naming_the_variable(environ, named):
    with pytest.raises(LaunchError) as caught:
        argv(environ)
    assert named in str(caught.value) and caught.value.exit_code == EXIT_CONFIG


@pytest.mark.parametrize("nproc", ["gpu", "²"])
def test_nonsense_process_counts_are_exit_2_through_the_cli(nproc, monkeypatch, capsys):
    monkeypatch.setenv("PET_NPROC_PER_NODE", nproc)
    monkeypatch.setattr(launch, "_has_cuda", lambda: False)
    assert cli.main(["launch", "--model_preset", "small", "--image_size", "16"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"PET_NPROC_PER_NODE={nproc!r}" in err and "Traceback" not in err


def test_exit_codes_fold_into_one_for_the_pod():
    def pod_code(worker_codes):
        return exit_code(launch.outcome_of_workers(worker_codes))

    assert pod_code([2, 2]) == EXIT_CONFIG
    assert pod_code([1, 3]) == EXIT_DIVERGED, "a permanent code wins over a crash"
    assert pod_code([2, EXIT_PREEMPTED]) == EXIT_PREEMPTED, "preemption wins: the retry resumes"
    assert pod_code([124, 124, 1]) == EXIT_STALLED, "the workers' common outcome"
    assert pod_code([-9]) == EXIT_FAILED and pod_code([]) == EXIT_FAILED and pod_code([137]) == EXIT_FAILED


def ddpm_launch(*args, **env):
    return subprocess.Popen([sys.executable, "-m", "trainer", "launch", *map(str, args)], cwd=REPO,
                            env=clean_env(**ENV, PET_MASTER_PORT=free_port(), **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_worker_exit_codes_come_through_torchrun(tmp_path):
    """2 (a data error inside the worker, with restarts allowed: they are not used), 3 (divergence) and 143
    (SIGTERM to the launcher, as the kubelet sends it) reach the pod's exit code."""
    config_error = ddpm_launch(*TINY, "--output_dir", tmp_path / "a", "--dataset_name", "imagefolder",
                               "--train_data_dir", tmp_path / "missing", PET_MAX_RESTARTS="2")
    out, _ = config_error.communicate(timeout=300)
    assert config_error.returncode == EXIT_CONFIG, out
    assert out.count("does not exist or is not a folder") == 1, "a permanent failure is not restarted"

    diverged = ddpm_launch(*TINY, "--output_dir", tmp_path / "b", "--learning_rate", "1e30", "--lr_warmup_steps", 0,
                           "--lr_scheduler", "constant", "--max_nonfinite_steps", 2, "--logging_steps", 1,
                           "--max_train_steps", 50, "--eval_quality_images", 0)
    out, _ = diverged.communicate(timeout=300)
    assert diverged.returncode == EXIT_DIVERGED, out

    preempted = ddpm_launch(*TINY, "--output_dir", tmp_path / "c", "--max_train_steps", 1000, "--logging_steps", 1,
                            "--eval_quality_images", 0)
    for line in preempted.stdout:
        if line.startswith("step 2/"):
            preempted.send_signal(signal.SIGTERM)
            break
    rest, _ = preempted.communicate(timeout=300)
    assert preempted.returncode == EXIT_PREEMPTED, rest
    assert "checkpoint saved at step" in rest


@pytest.fixture
def c10d_pod(tmp_path):
    """Starts one pod of the chart's `job` backend on this machine: `ddpm launch` with the c10d rendezvous hosted by
    node 0 at 127.0.0.1:`port`, its output in tmp_path/pod<index>-<incarnation>.log (0 for the first pod of that
    index). Whatever still runs at the end of the test is killed."""
    from helpers import kill_tree

    started = []

    def start(index, port, args, **env):
        env = {"PET_NNODES": "2", "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}",
               "PET_RDZV_ID": "test", "PET_RDZV_CONF": "join_timeout=120", "JOB_COMPLETION_INDEX": str(index), **env}
        log = tmp_path / f"pod{index}-{len(list(tmp_path.glob(f'pod{index}-*')))}.log"
        with open(log, "w") as sink:
            started.append(subprocess.Popen([sys.executable, "-m", "trainer", "launch", *map(str, args)], cwd=REPO,
                                            env=clean_env(**ENV, **env), stdout=sink, stderr=subprocess.STDOUT,
                                            start_new_session=True))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            try:
                kill_tree(proc.pid)
            except psutil.NoSuchProcess:  # it ended meanwhile
                pass
            proc.wait()


@pytest.mark.slow
def test_two_nodes_survive_losing_node_0_and_resume_from_the_newest_checkpoint(tmp_path, c10d_pod):
    """The chart's `job` backend on one machine: two `ddpm launch` pods meet through a c10d rendezvous hosted by
    node 0. Node 0 dies (SIGKILL of its whole tree, as when its node is lost): node 1's workers fail, torchrun
    restarts them, the rendezvous host is gone, and node 1 exits 143 (retryable, not counted). The replacement pods
    rejoin and every rank resumes from the newest checkpoint."""
    from helpers import kill_tree

    out = tmp_path / "out"
    port = free_port()
    args = [*TINY, "--output_dir", out, "--max_train_steps", 10, "--checkpointing_steps", 2, "--logging_steps", 1,
            "--save_image_epochs", 100, "--eval_quality_images", 0]

    def pod(index):
        return c10d_pod(index, port, args, PET_MAX_RESTARTS="1")

    node0, node1 = pod(0), pod(1)
    checkpoint = out / "checkpoints" / "checkpoint-4"  # renamed into place only once complete
    while not checkpoint.exists():
        assert node0.poll() is None and node1.poll() is None, (tmp_path / "pod0-0.log").read_text()
        _pause(node1)
    kill_tree(node0.pid)
    node0.wait()
    assert node1.wait(timeout=180) == EXIT_PREEMPTED, (tmp_path / "pod1-0.log").read_text()
    assert "lost the rendezvous after training started" in (tmp_path / "pod1-0.log").read_text()

    node0, node1 = pod(0), pod(1)  # the Job controller's replacement pods
    assert node0.wait(timeout=300) == 0 and node1.wait(timeout=300) == 0
    logs = (tmp_path / "pod0-1.log").read_text() + (tmp_path / "pod1-1.log").read_text()
    assert "resumed from" in logs and "global batch 8 = 4 per process x 1 accumulation x 2 processes" in logs
    assert (out / "training_complete.json").is_file()


@pytest.mark.slow
def test_peer_preemptions_never_use_up_the_restarts(tmp_path, c10d_pod):
    """PET_MAX_RESTARTS=1, and node 1 (not the store host) is lost three times in a row, each time replaced by a new
    pod: SIGTERM to its whole tree (a drain or a Spot notice: the ranks agree to stop, checkpoint, and exit 143),
    then twice SIGKILL (its node vanished: node 0's worker loses its peer mid-collective and exits 143). Node 0's
    agent restarts its workers each time without using its restart, never exits, and the run completes. Before, its
    worker crashed (exit 1) at a lost peer, and its agent spent its one restart on the first loss and exited at the
    second: 143 or 1, and a 1 counts against backoffLimit or fails a PyTorchJob."""
    from helpers import kill_tree

    out = tmp_path / "out"
    port = free_port()
    args = [*TINY, "--output_dir", out, "--max_train_steps", 16, "--checkpointing_steps", 4, "--logging_steps", 1,
            "--preemption_check_steps", 1, "--save_image_epochs", 100, "--eval_quality_images", 0]

    def pod(index):
        return c10d_pod(index, port, args, PET_MAX_RESTARTS="1")

    host_log = tmp_path / "pod0-0.log"
    host, node1 = pod(0), pod(1)
    _wait_for_a_step(host_log, 0, host, node1)  # rank 0 is node 0's worker (the first node by pid)
    recoveries = []
    for loss in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        offset, lost_at = host_log.stat().st_size, time.monotonic()
        if loss == signal.SIGKILL:
            kill_tree(node1.pid)
            node1.wait()
        else:
            for proc in [psutil.Process(node1.pid), *psutil.Process(node1.pid).children(recursive=True)]:
                proc.send_signal(loss)
            assert node1.wait(timeout=180) == EXIT_PREEMPTED, node1.args
        assert host.poll() is None, host_log.read_text()
        node1 = pod(1)  # the controller's replacement, once the lost pod has terminated
        step = _wait_for_a_step(host_log, offset, host, node1, after="resumed from")
        recoveries.append(round(time.monotonic() - lost_at, 1))
        assert step < 16, "the run must not end before the last loss"
    assert host.wait(timeout=300) == 0 and node1.wait(timeout=60) == 0, host_log.read_text()
    assert (out / "training_complete.json").is_file()
    log = host_log.read_text()
    assert log.count("without using a restart") == 3, log
    print(f"seconds from each loss of node 1 to the gang's next optimizer update: {recoveries}")


def _wait_for_a_step(log, offset, *running, after=""):
    """The number of the first status line ('step N/') that `log` got after `offset` bytes (and after a line holding
    `after`), while every process in `running` keeps running."""
    while True:
        text = log.read_text()[offset:]
        found = re.search(r"^step (\d+)/", text[text.find(after):] if after in text else "", re.MULTILINE)
        if found:
            return int(found[1])
        for proc in running:
            assert proc.poll() is None, f"exit {proc.returncode}: " + log.read_text()
        _pause(running[0])


@pytest.mark.slow
def test_a_late_store_host_is_waited_for_as_long_as_join_timeout(tmp_path, c10d_pod):
    """Node 0, which hosts the rendezvous store, starts 100 s after node 1 (its pod waited for a new GPU node or a
    slow image pull); join_timeout is 300 s. torch's store connection timed out after read_timeout (60 s by default),
    tried once more after a random backoff, and node 1 exited 1 between 85 and 126 s (measured; up to ~210 s by the
    backoff's bounds), counted against the retries. Now node 1 waits, and both train to the end."""
    out = tmp_path / "out"
    port = free_port()
    args = [*TINY, "--output_dir", out, "--max_train_steps", 4, "--logging_steps", 1, "--save_image_epochs", 100,
            "--eval_quality_images", 0]
    node1 = c10d_pod(1, port, args, PET_RDZV_CONF="join_timeout=300")
    try:  # node 0's pod is not there yet: the delay is the scenario, and node 1 must still be waiting after it
        early = node1.wait(timeout=100)
    except subprocess.TimeoutExpired:
        early = None
    log = (tmp_path / "pod1-0.log").read_text()
    assert early is None, f"node 1 gave up waiting for node 0 (exit {early}):\n{log}"
    # Each try of the store connection that times out is logged (torch TCPStore.cpp): the first one, at read_timeout
    # after the start, must not have ended yet (with 60 s it always had; the second try's end is left to chance).
    assert "failed to connect/validate" not in log, log
    node0 = c10d_pod(0, port, args, PET_RDZV_CONF="join_timeout=300")
    assert node0.wait(timeout=300) == 0, (tmp_path / "pod0-0.log").read_text()
    assert node1.wait(timeout=60) == 0, (tmp_path / "pod1-0.log").read_text()
    assert (out / "training_complete.json").is_file()


def _pause(proc):
    """Wait a little for `proc` (it must keep running): the poll interval of the loop above."""
    try:
        proc.wait(timeout=0.2)
    except subprocess.TimeoutExpired:
        pass
