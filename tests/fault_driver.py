"""Fault injection for tests: the real CLI (`python -m trainer`), with faults placed exactly where a test needs
them, so no test has to guess timings:

    python tests/fault_driver.py [--nan SPEC] [--nan-samples WHERE] [--adverse-rounding]
                                 [--signal PHASE[:SIGNAL[:COUNT]]] [--die UPDATE] [--hang WHERE] ddpm-args...

--nan SPEC      the loss is NaN in the optimizer updates (0-based) in SPEC ("3,4", or "5-" for 5 onward)
--nan-samples WHERE[:RANK]   sampled images are NaN in the loop's evaluations (eval), in the end-of-run check of
                the saved pipeline (final), or both (all); on rank RANK only when given
--adverse-rounding    DDIM's variance comes out 4 ulps too large, rounding as the EPYC of issue 16 did and worse
--signal ...    the process sends itself SIGNAL (TERM or INT, default TERM), COUNT times (default 1), during PHASE:
                import (while diffusers is being imported), scan (while the image folder is decoded), cache (half-way
                through writing the data cache), final_save (while the final pipeline is written), step-N (just
                after optimizer update N), eval (at the third DDIM step of the first evaluation; it prints how many
                sampler steps ran after the signal).
--die UPDATE    the process SIGKILLs itself as it starts optimizer update UPDATE (1 is the first of this process's run):
                a peer process lost mid-training, as when its node vanishes.
--hang WHERE    the process blocks for good (a hung collective or volume) as it starts optimizer update N (update-N),
                at the second sampler step of the first evaluation (eval), or inside the first checkpoint save
                (checkpoint); slow-eval:SECONDS makes every sampler step of the evaluations SECONDS longer instead.
Everything else is exactly `ddpm`: the same entry point, signal handling included.
"""

import os
import signal
import sys


def send(signame: str, count: int) -> None:
    """The first signal may raise (the handler's `raise` mode): the rest arrive while that unwinds."""
    signum = getattr(signal, f"SIG{signame}")
    try:
        os.kill(os.getpid(), signum)
    finally:
        for _ in range(count - 1):
            os.kill(os.getpid(), signum)


def inject_nan(spec: str) -> None:
    import trainer.loop as loop

    real = loop.training_loss

    def bad(update: int) -> bool:
        if spec.endswith("-"):
            return update >= int(spec[:-1])
        return update in {int(s) for s in spec.split(",")}

    def training_loss(*args, update, **kwargs):
        loss = real(*args, update=update, **kwargs)
        return loss * float("nan") if bad(update) else loss

    loop.training_loss = training_loss


def inject_nan_samples(spec: str) -> None:
    import trainer.loop as loop
    import trainer.sampling as sampling

    where, _, rank = spec.partition(":")
    if rank and os.environ.get("RANK", "0") != rank:
        return

    real_denoise, real_evaluate, real_check = sampling.denoise, loop.evaluate, sampling.check_saved_pipeline
    active = {"now": False}

    def denoise(*args, **kwargs):
        images = real_denoise(*args, **kwargs)
        return images * float("nan") if active["now"] else images

    def during(function, on: bool):
        def call(*args, **kwargs):
            active["now"] = on
            try:
                return function(*args, **kwargs)
            finally:
                active["now"] = False
        return call

    sampling.denoise = denoise
    loop.evaluate = during(real_evaluate, where in ("eval", "all"))
    sampling.check_saved_pipeline = during(real_check, where in ("final", "all"))


def adversely_rounded(real_get_variance, ulps: int):
    """DDIM's `_get_variance` made `ulps` ulps too large, as a badly rounding CPU would (tests/test_sampling.py). An
    exact 0 (the last step, a_prev = 1) stays 0: 0 * x is exact on every IEEE machine."""
    import torch

    def nudged(self, timestep, prev_timestep):
        variance = real_get_variance(self, timestep, prev_timestep)
        up = variance
        for _ in range(ulps):
            up = torch.nextafter(up, torch.tensor(float("inf")))
        return torch.where(variance > 0, up, variance)

    return nudged


def inject_adverse_rounding(ulps: int = 4) -> None:
    from diffusers import DDIMScheduler

    DDIMScheduler._get_variance = adversely_rounded(DDIMScheduler._get_variance, ulps)


def inject_death(update: int) -> None:
    import trainer.loop as loop

    real_step = loop.train_step

    def train_step(run, *args):
        if run.state.global_step + 1 == update:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(run, *args)

    loop.train_step = train_step


def inject_hang(where: str) -> None:
    import threading
    import time

    import trainer.loop as loop
    import trainer.sampling as sampling

    def hang():
        print(f"fault_driver: hanging ({where})", file=sys.stderr, flush=True)
        threading.Event().wait()

    if where.startswith("update-"):
        real_step, target = loop.train_step, int(where[len("update-"):])

        def train_step(run, *args):
            if run.state.global_step + 1 == target:
                hang()
            return real_step(run, *args)

        loop.train_step = train_step
    elif where == "checkpoint":
        real_save = loop.checkpoint.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            hang()
            return real_save(*args, **kwargs)

        loop.checkpoint.save_checkpoint = save_checkpoint
    elif where == "eval" or where.startswith("slow-eval:"):
        real_step, seen = sampling.MarginDDIMScheduler.step, {"steps": 0}

        def step(self, *args, **kwargs):
            seen["steps"] += 1
            if where == "eval" and seen["steps"] == 2:
                hang()
            elif where != "eval":
                time.sleep(float(where.partition(":")[2]))  # the fault itself: a slow sampler step
            return real_step(self, *args, **kwargs)

        sampling.MarginDDIMScheduler.step = step
    else:
        raise SystemExit(f"unknown --hang {where}")


def inject_signal(phase: str, signame: str, count: int) -> None:
    if phase == "import":
        class SignalOnImport:
            def find_spec(self, name, path=None, target=None):
                if name == "diffusers":
                    sys.meta_path.remove(self)
                    send(signame, count)
                return None

        sys.meta_path.insert(0, SignalOnImport())
        return
    import trainer.data as data
    import trainer.data_cache as data_cache
    import trainer.loop as loop

    if phase == "scan":
        real_load = data.ImageSource.__init__

        def init(self, *args, **kwargs):  # the first image decoded by the scan sends the signal
            real_load(self, *args, **kwargs)
            load = self.load

            def loading(i):
                if i == 1:
                    send(signame, count)
                return load(i)

            self.load = loading

        data.ImageSource.__init__ = init
    elif phase == "cache":
        real_write = data_cache._write

        def write(config, source, tmp):
            source_load = source.load

            def loading(i):
                if i == source.length // 2:
                    send(signame, count)
                return source_load(i)

            source.load = loading
            return real_write(config, source, tmp)

        data_cache._write = write
    elif phase == "final_save":
        from trainer.run_dir import RunDir

        real_save = RunDir.save_pipeline

        def save_pipeline(*args, **kwargs):
            send(signame, count)
            return real_save(*args, **kwargs)

        RunDir.save_pipeline = save_pipeline
    elif phase == "eval":  # the third sampler step of the first evaluation; counts the steps sampled after it
        import atexit

        import trainer.sampling as sampling

        real_step, seen = sampling.MarginDDIMScheduler.step, {"steps": 0, "after": 0}

        def step(self, *args, **kwargs):
            seen["steps"] += 1
            if seen["steps"] == 3:
                send(signame, count)
            elif seen["steps"] > 3:
                seen["after"] += 1
            return real_step(self, *args, **kwargs)

        sampling.MarginDDIMScheduler.step = step
        atexit.register(lambda: print(f"fault_driver: sampler steps after the signal: {seen['after']}",
                                      file=sys.stderr, flush=True))
    elif phase.startswith("step-"):
        target, real_step = int(phase[5:]), loop.train_step

        def train_step(run, *args):
            real_step(run, *args)
            if run.state.global_step == target:
                send(signame, count)

        loop.train_step = train_step
    else:
        raise SystemExit(f"unknown phase {phase}")


if __name__ == "__main__":
    from trainer.signals import SIGNALS

    SIGNALS.install()  # as trainer.main does, before anything heavy
    args = sys.argv[1:]
    while args and args[0] in ("--nan", "--signal", "--nan-samples", "--adverse-rounding", "--die", "--hang"):
        if args[0] == "--adverse-rounding":
            inject_adverse_rounding()
            args = args[1:]
            continue
        flag, value, args = args[0], args[1], args[2:]
        if flag == "--nan-samples":
            inject_nan_samples(value)
        elif flag == "--nan":
            inject_nan(value)
        elif flag == "--die":
            inject_death(int(value))
        elif flag == "--hang":
            inject_hang(value)
        else:
            phase, signame, count = [*value.split(":"), "", ""][:3]
            signame, count = signame or "TERM", count or "1"
            inject_signal(phase, signame, int(count))
    from trainer.main import entrypoint

    sys.argv = ["ddpm", *args]
    entrypoint()
