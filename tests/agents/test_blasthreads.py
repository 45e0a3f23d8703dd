"""A process that builds a numpy stage caps its BLAS threads unless the operator chose a number."""

from __future__ import annotations

import os
import subprocess
import sys

from shardplane.agents.blasthreads import OPERATOR_ENVS, wanted_blas_threads

# Builds a one-layer numpy stage the way a worker does (agents.backends.build_stage), then
# prints how many threads the process's BLAS uses.
SCRIPT = """
import numpy as np
from threadpoolctl import threadpool_info
from shardplane.agents.backends import build_stage
from shardplane.agents.executor import ModelConfig
c = ModelConfig(layers=1, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=32)
shapes = {
    "input_layernorm.weight": (8,), "post_attention_layernorm.weight": (8,),
    "self_attn.q_proj.weight": (8, 8), "self_attn.k_proj.weight": (4, 8),
    "self_attn.v_proj.weight": (4, 8), "self_attn.o_proj.weight": (8, 8),
    "mlp.gate_proj.weight": (16, 8), "mlp.up_proj.weight": (16, 8),
    "mlp.down_proj.weight": (8, 16),
}
tensors = {"model.layers.0." + n: np.ones(s, np.float32) for n, s in shapes.items()}
build_stage(c, tensors, layer_start=0, layer_end=1, embeddings=False, head=False,
            backend="numpy")
print(max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"))
"""


def blas_threads_after_build(**env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in OPERATOR_ENVS}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_wanted_is_half_the_cores_unless_the_operator_chose() -> None:
    assert wanted_blas_threads({}, 2) == 1
    assert wanted_blas_threads({}, 16) == 8
    assert wanted_blas_threads({}, 1) == 1
    assert wanted_blas_threads({}, None) == 1
    assert wanted_blas_threads({"OPENBLAS_NUM_THREADS": "4"}, 16) is None
    assert wanted_blas_threads({"OMP_NUM_THREADS": "2"}, 16) is None
    assert wanted_blas_threads({"OMP_NUM_THREADS": " "}, 16) == 8  # blank: not a choice


def test_building_a_numpy_stage_caps_blas_threads() -> None:
    assert blas_threads_after_build() == max(1, (os.cpu_count() or 1) // 2)


def test_the_operators_setting_wins() -> None:
    assert blas_threads_after_build(OPENBLAS_NUM_THREADS="2") == 2
