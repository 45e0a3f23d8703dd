"""How many BLAS threads a process that runs numpy stages uses.

Why: numpy's OpenBLAS starts one thread per core, and after each call its idle threads spin
(busy-wait) for a while before they sleep. A stage's decode step is a string of small
matrix-vector products, each too small to gain from threads, and between steps the process
waits for the other stages, which on the same host need those cores: the spinning threads of a
waiting stage steal the core of the one computing. Measured on this 2-core machine under load:
the bare SmolLM2 forward 47-59 ms/token with 1 BLAS thread, 120-310 ms/token with 2. So, as
the torch executor caps its pool (``agents.executor_torch``), a process that builds a numpy
stage caps BLAS at half the cores, unless the operator chose a number
(``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``), which always wins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

OPERATOR_ENVS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def wanted_blas_threads(env: Mapping[str, str], cpus: int | None) -> int | None:
    """The BLAS thread cap for a stage process: None when the operator set one in ``env``,
    else half of ``cpus`` (at least 1)."""
    if any(env.get(name, "").strip() for name in OPERATOR_ENVS):
        return None
    return max(1, (cpus or 1) // 2)


def cap_blas_threads() -> int | None:
    """Apply ``wanted_blas_threads`` to this process's BLAS pools; the cap applied, or None
    when the operator's setting stands."""
    limit = wanted_blas_threads(os.environ, os.cpu_count())
    if limit is None:
        return None
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=limit, user_api="blas")
    log.debug("BLAS threads capped at %d", limit)
    return limit
