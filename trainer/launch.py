"""`ddpm launch`: the container entrypoint. torchrun, with its settings read from the pod's environment.

The environment is what Kubernetes and the operators inject, under torchrun's own names: PET_NNODES ("N" or
"MIN:MAX"), PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR/PET_MASTER_PORT (the Kubeflow PyTorchJob and TrainJob
operators), PET_RDZV_BACKEND/PET_RDZV_ENDPOINT/PET_RDZV_ID/PET_RDZV_CONF/PET_MAX_RESTARTS (the chart's Indexed Job
and a PyTorchJob's elasticPolicy), and on a plain Indexed Job the node rank JOB_COMPLETION_INDEX. Every value is
validated first: a bad one is exit 2 naming the variable, never a traceback or a rendezvous that waits forever.

What torchrun does not do, this adds:
- The worker exit codes survive (2 config, 3 diverged, 143 preempted), so a Job's podFailurePolicy or an operator's
  ExitCode policy can tell "retry" from "give up".
- torchrun restarts a failed worker group up to --max-restarts times (with c10d every node restarts and all ranks
  resume from the newest checkpoint), but a worker that exited 2 or 3 would fail again the same way: those stop
  the restarts at once; and workers that exited 143 (a peer preempted or lost) restart without using one
  (PermanentFailureAgent).
- SIGTERM gives the workers the preemption grace to save before torchrun kills them.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import Counter

from trainer.errors import EXIT_PREEMPTED, LaunchError, Outcome, TransientError, outcome_of_exit_code

# Seconds torchrun waits, after forwarding SIGTERM, beyond the trainer's own grace before it SIGKILLs workers.
SHUTDOWN_MARGIN_S = 15
PERMANENT_OUTCOMES = (Outcome.REFUSED, Outcome.DIVERGED)  # a restart cannot help: stop restarting
# A pod whose node 0 (the rendezvous store's host) starts later than its own pod must wait for it as long as for the
# other nodes: torch connects to the store with `read_timeout` as the TCPStore timeout, retrying (DNS failures too)
# until it passes, and only then starts counting `join_timeout` (torch/distributed/elastic/rendezvous/
# c10d_rendezvous_backend.py `_create_tcp_store`; dynamic_rendezvous.py `next_rendezvous`). Unset, read_timeout is
# 60 s, so a node 0 two minutes late failed the pod (exit 1, counted) whatever join_timeout said: ddpm launch sets
# it to join_timeout when PET_RDZV_CONF (the chart's, or the training operator's from elasticPolicy.rdzvConf) does
# not. read_timeout also bounds the store waits for keys just after a rendezvous (rank assignment, agent/server/
# api.py `_assign_worker_ranks`): a peer lost in that instant is noticed after join_timeout instead of 60 s.
READ_TIMEOUT_DEFAULT_S = 60  # torch's, c10d_rendezvous_backend.py
JOIN_TIMEOUT_DEFAULT_S = 600  # torch's, dynamic_rendezvous.py RendezvousTimeout
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def _int(environ: dict[str, str], name: str, minimum: int, maximum: int | None = None) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    if not re.fullmatch(r"[0-9]+|-[0-9]+", value.strip()):  # int() also reads '٣' and other Unicode digits
        raise LaunchError(f"{name}={value!r} is not a whole number")
    number = int(value.strip())
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise LaunchError(f"{name}={value!r} must be {bound}")
    return number


def _nnodes(environ: dict[str, str]) -> tuple[int, int] | None:
    value = environ.get("PET_NNODES", "").strip()
    if not value:
        return None
    match = re.fullmatch(r"(\d+)(?::(\d+))?", value)
    if not match:
        raise LaunchError(f"PET_NNODES={value!r} must be a node count N or a range MIN:MAX (e.g. 4 or 2:4)")
    low, high = int(match[1]), int(match[2] or match[1])
    if low < 1 or high < low:
        raise LaunchError(f"PET_NNODES={value!r}: need 1 <= MIN <= MAX")
    return low, high


def torchrun_argv(environ: dict[str, str], grace_seconds: float, train_args: list[str],
                  has_cuda: bool | None = None) -> list[str]:
    """torchrun's arguments for this pod, or LaunchError naming the first bad variable."""
    nodes = _nnodes(environ)
    low, high = nodes or (1, 1)
    nproc = environ.get("PET_NPROC_PER_NODE", "").strip()
    # str.isdigit() accepts '²', which int() then rejects: only ASCII digits are a count.
    if nproc and nproc not in ("gpu", "cpu", "auto") and not (re.fullmatch(r"[0-9]+", nproc) and int(nproc) >= 1):
        raise LaunchError(f"PET_NPROC_PER_NODE={nproc!r} must be a process count >= 1 (or gpu, cpu, auto)")
    if nproc in ("", "gpu"):
        cuda = _has_cuda() if has_cuda is None else has_cuda
        if nproc == "gpu" and not cuda:  # torchrun would stop with a traceback: ValueError("Cuda is not available.")
            raise LaunchError("PET_NPROC_PER_NODE='gpu' but this node has no CUDA GPU (torch.cuda.is_available() is "
                              "false); set a process count such as PET_NPROC_PER_NODE=1, or run on a GPU node")
        nproc = nproc or ("gpu" if cuda else "1")
    rank_var = "PET_NODE_RANK" if environ.get("PET_NODE_RANK", "") != "" else "JOB_COMPLETION_INDEX"
    node_rank = _int(environ, rank_var, 0)
    if node_rank is not None and node_rank >= high:
        hint = "" if nodes else " (PET_NNODES is not set, so there is 1 node)"
        raise LaunchError(f"{rank_var}={node_rank} but there are {high} node(s){hint}: a node rank must be below "
                          "the node count")
    max_restarts = _int(environ, "PET_MAX_RESTARTS", 0) or 0
    argv = [f"--nnodes={low}:{high}" if low != high else f"--nnodes={low}", f"--nproc_per_node={nproc}",
            f"--max_restarts={max_restarts}", f"--shutdown_timeout={int(grace_seconds) + SHUTDOWN_MARGIN_S}"]
    backend = environ.get("PET_RDZV_BACKEND", "").strip() or "static"
    if backend == "static":
        if low != high:
            raise LaunchError(f"PET_NNODES={environ['PET_NNODES']!r} is a range, which needs a dynamic rendezvous: "
                              "set PET_RDZV_BACKEND=c10d and PET_RDZV_ENDPOINT")
        port = _int(environ, "PET_MASTER_PORT", 1, 65535) or 29500
        addr = environ.get("PET_MASTER_ADDR", "").strip() or "127.0.0.1"
        if high > 1 and not environ.get("PET_MASTER_ADDR", "").strip():
            raise LaunchError(f"PET_NNODES={high} but PET_MASTER_ADDR is not set: the nodes cannot find node 0")
        argv += [f"--node_rank={node_rank or 0}", f"--master_addr={addr}", f"--master_port={port}"]
    elif backend == "c10d":
        endpoint = environ.get("PET_RDZV_ENDPOINT", "").strip()
        if not _HOST_PORT.match(endpoint) or not 0 < int(endpoint.rsplit(":", 1)[1]) < 65536:
            raise LaunchError(f"PET_RDZV_ENDPOINT={endpoint!r} must be HOST:PORT (node 0's stable name and a port)")
        conf = _rdzv_conf(environ.get("PET_RDZV_CONF", ""))
        if "read_timeout" not in conf:
            conf["read_timeout"] = str(max(int(conf.get("join_timeout", JOIN_TIMEOUT_DEFAULT_S)),
                                           READ_TIMEOUT_DEFAULT_S))
        if node_rank is not None and "is_host" not in conf:
            conf["is_host"] = "true" if node_rank == 0 else "false"  # node 0 hosts the store, whatever DNS says
        argv += ["--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                 f"--rdzv_id={environ.get('PET_RDZV_ID', '').strip() or 'ddpm'}"]
        if conf:
            argv.append("--rdzv_conf=" + ",".join(f"{k}={v}" for k, v in conf.items()))
    else:
        raise LaunchError(f"PET_RDZV_BACKEND={backend!r} is not supported; use c10d (or leave it unset: static)")
    return [*argv, "-m", "trainer", "train", *train_args]


def _rdzv_conf(value: str) -> dict[str, str]:
    conf = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise LaunchError(f"PET_RDZV_CONF={value!r} must be key=value pairs separated by commas "
                              "(e.g. join_timeout=1800)")
        if key.strip().endswith("timeout") and not val.strip().isdigit():
            raise LaunchError(f"PET_RDZV_CONF: {key.strip()}={val!r} must be a number of seconds")
        conf[key.strip()] = val.strip()
    return conf


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def outcome_of_workers(worker_codes: list[int]) -> Outcome:
    """One outcome for the pod from its workers' exit codes: preempted wins (retry); else a permanent one (config,
    diverged); else the workers' most common one; else failure. A worker killed by a signal (a negative code) or
    ending with a code of no outcome of ours counts as a failure."""
    outcomes = [outcome_of_exit_code(code) for code in worker_codes]
    if Outcome.PREEMPTED in outcomes:
        return Outcome.PREEMPTED
    for outcome in PERMANENT_OUTCOMES:
        if outcome in outcomes:
            return outcome
    return Counter(outcomes).most_common(1)[0][0] if outcomes else Outcome.FAILED


def permanent_failure_agent():
    """torch's LocalElasticAgent, except for what its restarts count (torch/distributed/elastic/agent/server/api.py
    `_invoke_run` restarts the workers on any failure and counts every one against --max-restarts):
    - a worker exiting 2 or 3 uses up the restarts: restarting would only fail again;
    - workers that all exited 143 use none: they stopped because a peer was preempted (the ranks agree on a SIGTERM
      and checkpoint together) or lost a peer after training (trainer.errors.PeerLost), so after max-restarts
      preemptions of other pods every survivor exited, 143 or 1, and a PyTorchJob failed on the 1.
    It also records whether workers ever started, to tell a lost rendezvous from one never joined."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class PermanentFailureAgent(LocalElasticAgent):
        workers_started = False

        def _start_workers(self, worker_group):
            PermanentFailureAgent.workers_started = True
            return super()._start_workers(worker_group)

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            outcomes = [outcome_of_exit_code(failure.exitcode) for failure in result.failures.values()]
            if result.state == WorkerState.FAILED and any(outcome in PERMANENT_OUTCOMES for outcome in outcomes):
                self._remaining_restarts = 0
            elif result.state == WorkerState.FAILED and outcomes and all(o == Outcome.PREEMPTED for o in outcomes):
                # _invoke_run takes one restart before each restart and has no hook to skip that: give it back.
                self._remaining_restarts += 1
                print(f"ddpm launch: the workers exited {EXIT_PREEMPTED} (a peer was preempted or lost): restarting "
                      f"them without using a restart ({self._remaining_restarts - 1} left)", file=sys.stderr,
                      flush=True)
            return result

    return PermanentFailureAgent


def launch(train_args: list[str], grace_seconds: float, environ: dict[str, str] | None = None) -> Outcome:
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    environ = dict(os.environ if environ is None else environ)
    argv = torchrun_argv(environ, grace_seconds, train_args)
    print("ddpm launch: torchrun " + " ".join(argv), file=sys.stderr, flush=True)
    # launch_agent() builds the agent from this module attribute (torch/distributed/launcher/api.py).
    agent = launcher_api.LocalElasticAgent = permanent_failure_agent()
    # Shared with the workers (torch's default), the rendezvous store's address for them is published by the rank-0
    # agent only in the first round it is rank 0 (rendezvous/dynamic_rendezvous.py next_rendezvous caches
    # _bootstrap_store_info), so a node that joins a later round (a replaced pod, a returning elastic node) waits
    # for it until read_timeout while rank 0 waits for that node's rank info (agent/server/api.py
    # _assign_worker_ranks): the workers never start. Unshared, every round publishes it (rendezvous/api.py
    # RendezvousStoreInfo.build) and the workers' rank 0 hosts their store, as before torch 2.4.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        return outcome_of_workers([failure.exitcode for failure in e.failures.values()])
    except SignalException as e:  # the workers got the signal too, and up to the grace period to checkpoint
        return Outcome.INTERRUPTED if e.sigval == signal.SIGINT else Outcome.PREEMPTED
    except (RendezvousError, DistError) as e:
        if not agent.workers_started:
            raise TransientError(f"the rendezvous was never completed ({type(e).__name__}: {e}); check "
                                 "PET_RDZV_ENDPOINT / PET_MASTER_ADDR and that every node's pod is running") from e
        # The gang lost its rendezvous host (node 0's pod was replaced, or its node preempted): not this pod's
        # fault, and the retry resumes from the newest checkpoint, like a preemption (143 is retryable for the
        # training operator's ExitCode policy; an exit 1 would fail a PyTorchJob for good).
        print(f"ddpm launch: lost the rendezvous after training started ({type(e).__name__}: {e}); exiting "
              f"{EXIT_PREEMPTED} to be retried", file=sys.stderr, flush=True)
        return Outcome.PREEMPTED
    return Outcome.OK
