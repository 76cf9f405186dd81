"""The process-wide state that one training run owns, from its start to its end.

accelerate keeps its state in class-level singletons (`PartialState`, `AcceleratorState`,
`GradientState`): a second `Accelerator` in the same process inherits the first one's mixed
precision, device and distributed type, or refuses another precision ("AcceleratorState has
already been initialized"). DeepSpeed keeps its engines' hooks and garbage-collector settings
and its communication groups in module globals, torch keeps one default process group, and
accelerate writes `ACCELERATE_USE_*` variables into the environment (and, for several CPU
processes without OMP_NUM_THREADS, sets torch's thread count). Runs that share a process (a
Hydra multirun sweep, a test session, a notebook) would see each other's.

`RunScope` is the one place that owns all of it. Entering starts from accelerate's initial
state, saves the global RNG state, the thread count and the environment, and joins the process
group of a multi-process launch (`distributed.join_launch_group`). Leaving, normally or by an
exception, frees the run's accelerators (DeepSpeed engines included), destroys the process group
the run joined (through DeepSpeed when DeepSpeed wraps it, which also drops its group
references), resets accelerate's shared state as accelerate's own test cases and transformers'
hyperparameter search do (`AcceleratorState._reset_state(True)`, `GradientState._reset_state()`)
and restores the environment, the thread count and the RNG state.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import ExitStack
from types import TracebackType

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState

from sae_dist.distributed import Topology, init_process_group

log = logging.getLogger(__name__)

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""Process-group variables that accelerate (multi-CPU) or DeepSpeed (MPI discovery) may write;
restored with every `ACCELERATE_*` variable when a run ends."""


class RunScope:
    """Context manager around one run: `with RunScope(timeout_s) as scope:` gives
    `scope.topology` (rank, world size; data_shards = world size) and releases everything the
    run created when the block ends. Accelerators the run builds are handed to `own`."""

    def __init__(self, timeout_s: float):
        """`timeout_s`: seconds a collective of the process group may wait (trainer.timeout_s)."""
        self.timeout_s = timeout_s
        self.topology = Topology(0, 1, 1)
        self._accelerators: list[Accelerator] = []
        self._exit = ExitStack()

    def __enter__(self) -> RunScope:
        if PartialState._shared_state:
            log.info("clearing the accelerate state left in this process by earlier code")
        reset_accelerate_state()
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices()))
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            stack.callback(restore_env, launch_env())
            stack.callback(reset_accelerate_state)
            if not process_group_active():
                stack.callback(destroy_process_group)
            stack.callback(self._free_accelerators)
            self.topology = init_process_group(self.timeout_s) or self.topology
            self._exit = stack.pop_all()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exit.close()

    def own(self, accelerator: Accelerator) -> Accelerator:
        """Register `accelerator` to be freed (its prepared models, optimizers and DeepSpeed
        engine) when the run ends; returns it."""
        self._accelerators.append(accelerator)
        return accelerator

    def _free_accelerators(self) -> None:
        while self._accelerators:
            self._accelerators.pop().free_memory()


def reset_accelerate_state() -> None:
    """Clear accelerate's shared state (precision, device, distributed type, gradient state):
    the next `Accelerator` starts from its constructor's arguments alone."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def process_group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def destroy_process_group() -> None:
    """Destroy the default process group: through DeepSpeed when its communication backend
    wraps it (DeepSpeed then drops its own group references), else through torch."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    elif process_group_active():
        dist.destroy_process_group()
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()


def launch_env() -> dict[str, str | None]:
    """The current values of the variables a run's accelerate/DeepSpeed set-up may write."""
    names = set(LAUNCH_ENV) | {k for k in os.environ if k.startswith("ACCELERATE_")}
    return {name: os.environ.get(name) for name in names}


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back the `launch_env` values and drop `ACCELERATE_*` variables added since."""
    for name in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in saved]:
        del os.environ[name]
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def cuda_devices() -> list[int]:
    """Every CUDA device index (their RNG states are saved with the CPU's); [] without CUDA."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
