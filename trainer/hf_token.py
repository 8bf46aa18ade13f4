"""The Hugging Face token: where it comes from ($HF_TOKEN only) and its removal from everything printed."""

from __future__ import annotations

import os

TOKEN_ENV = "HF_TOKEN"
TOKEN_HELP = (
    "create a write token at https://huggingface.co/settings/tokens and export HF_TOKEN=hf_... "
    "(on Kubernetes: the Secret named by push.tokenSecret, key push.tokenSecretKey)"
)


def token(environ: dict[str, str] | None = None) -> str | None:
    return (os.environ if environ is None else environ).get(TOKEN_ENV, "").strip() or None


def redact_token(text: str, secret: str | None) -> str:
    return text.replace(secret, "<HF_TOKEN>") if secret else text


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """`text` with the HF_TOKEN value replaced: for every message that might echo a request or a header."""
    return redact_token(text, token(environ))
