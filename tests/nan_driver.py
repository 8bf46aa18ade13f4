"""Fault injection for tests: `python tests/nan_driver.py SPEC ddpm-args...` runs the real CLI with the loss made
NaN on the micro-steps in SPEC ("3,4" or "5-" for 5 onward). Nothing else differs from `python -m trainer`."""

import sys

import trainer.loop as loop
from trainer.cli import main


def bad(spec: str, micro_step: int) -> bool:
    if spec.endswith("-"):
        return micro_step >= int(spec[:-1])
    return micro_step in {int(s) for s in spec.split(",")}


def inject(spec: str):
    real = loop.training_loss

    def training_loss(*args, micro_step, **kwargs):
        loss = real(*args, micro_step=micro_step, **kwargs)
        return loss * float("nan") if bad(spec, micro_step) else loss

    loop.training_loss = training_loss


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
