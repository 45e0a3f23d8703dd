"""The planner: model catalog, ``hf:`` reader, cost model, greedy + CP-SAT solvers, validator,
memory ledger, the ``placement.request`` service and exports for inference engines.

Nothing here imports ortools at module load: CP-SAT is imported lazily by ``planner.solver``
only when a heterogeneous plan actually needs it (the import costs about 0.25 s).
"""
