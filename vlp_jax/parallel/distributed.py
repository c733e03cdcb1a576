"""Multi-process start-up: `jax.distributed.initialize` when launched as several processes."""
from __future__ import annotations

import os

import jax

# Set by the launcher (or by hand): coordinator address, number of processes, this process id.
ENV_VARS = ("VLP_JAX_COORDINATOR", "VLP_JAX_NUM_PROCESSES", "VLP_JAX_PROCESS_ID")


def maybe_initialize_distributed() -> bool:
    """Initialises jax.distributed when the VLP_JAX_* variables are set; returns whether it did.

    On TPU pods and SLURM/Kubernetes GPU clusters, `jax.distributed.initialize()` with no
    arguments discovers the cluster itself: set VLP_JAX_DISTRIBUTED=auto for that.
    """
    if os.environ.get("VLP_JAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    if not all(v in os.environ for v in ENV_VARS):
        return False
    jax.distributed.initialize(coordinator_address=os.environ["VLP_JAX_COORDINATOR"],
                               num_processes=int(os.environ["VLP_JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["VLP_JAX_PROCESS_ID"]))
    return True
