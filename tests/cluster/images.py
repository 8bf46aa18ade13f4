"""What the process kubelet runs for an image reference: no image is pulled (there is no registry here), so each image the
tests use is described by what it would contain.

- The project's image (`docker build .`, the chart's `image.repository`): the ENV, WORKDIR and ENTRYPOINT of the
  Dockerfile's stage, read from the Dockerfile itself, and its /opt/venv is this checkout's venv (bind-mounted at
  /opt/venv in the pod's mount namespace), whose editable install is this checkout's `trainer`. So the pod runs the
  code under test with the Dockerfile's environment, unchanged.
- busybox (the chart's `helm test` pod): the host's sh and wget.
An image the kubelet does not know fails like a pull that cannot succeed (ErrImagePull, then ImagePullBackOff).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the Debian base images' PATH


@dataclass(frozen=True)
class Image:
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir: str = "/"
    mounts: tuple[tuple[str, str], ...] = ()  # (path in the image, host folder): what the image's layers hold


def dockerfile_stage(dockerfile: Path, target: str | None = None) -> tuple[dict[str, str], list[str], list[str], str]:
    """ENV, ENTRYPOINT, CMD and WORKDIR of a stage (`target`, or the last one) of a Dockerfile, with ${VAR}/$VAR
    expanded against the stage's own ENV as docker does."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: dict[str | None, tuple] = {}
    env, entrypoint, cmd, workdir, name = {"PATH": BASE_PATH}, [], [], "/", None
    for line in text.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        keyword = instruction.upper()
        if keyword == "FROM":
            if name is not None or env != {"PATH": BASE_PATH}:
                stages[name] = (env, entrypoint, cmd, workdir)
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            env, entrypoint, cmd, workdir = {"PATH": BASE_PATH}, [], [], "/"
        elif keyword == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], ""), value)
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif keyword == "CMD":
            cmd = json.loads(rest)
        elif keyword == "WORKDIR":
            workdir = rest.strip()
    stages[name] = (env, entrypoint, cmd, workdir)
    last = list(stages)[-1]
    return stages[target if target is not None else last]


def project_image(checkout: Path, venv: Path, target: str | None = None) -> Image:
    env, entrypoint, cmd, workdir = dockerfile_stage(checkout / "Dockerfile", target)
    # The image holds this checkout's `trainer`; the venv's editable install may point at another checkout (a git
    # worktree sharing one venv), so this checkout comes first on the path, as `COPY trainer` puts it in the image.
    env["PYTHONPATH"] = str(checkout)
    return Image(env=env, entrypoint=tuple(entrypoint), cmd=tuple(cmd), workdir=workdir,
                 mounts=(("/opt/venv", str(venv)),))


BUSYBOX = Image(env={"PATH": BASE_PATH}, cmd=("sh",))


def repository(reference: str) -> str:
    """`ghcr.io/example/ddpm-trainer:0.1.0` -> `ghcr.io/example/ddpm-trainer` (tag and digest dropped)."""
    name = reference.split("@", 1)[0]
    head, _, tail = name.rpartition("/")
    return f"{head}/{tail.split(':', 1)[0]}" if head else tail.split(":", 1)[0]


class Images:
    def __init__(self, known: dict[str, Image]):
        self.known = dict(known)

    def add(self, repo: str, image: Image) -> None:
        self.known[repo] = image

    def find(self, reference: str) -> Image | None:
        return self.known.get(repository(reference))
