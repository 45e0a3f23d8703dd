"""One exception tree for the whole code base: ``ShardplaneError`` at the root, one base per
package under it.

Why: a caller at a service edge (the API's error mapping, the command line's exit status, a
worker's failed status) can tell "ours, with a message meant for a person" from a bug or a
library's exception by one ``except``, and a package's own failures by one base. Each concrete
error keeps the builtin base it always had (ValueError, RuntimeError, LookupError) as a second
parent, so every ``except ValueError`` that caught it still does.
"""

from __future__ import annotations


class ShardplaneError(Exception):
    """Raised by shardplane code for a condition it names (bad input, lost lease, ...)."""


class BusError(ShardplaneError):
    """The contract layer: ids, codecs, streams, credentials, checkpoints."""


class AgentError(ShardplaneError):
    """Node agents: GPU backends, fleets, loading shards."""


class ProjectorError(ShardplaneError):
    """The projector: leases, partitions, KV writes."""


class PlannerError(ShardplaneError):
    """The planner: models, plans, exports."""


class ApiServerError(ShardplaneError):
    """The status API."""


class CommandError(ShardplaneError):
    """The ``shardplane`` command and its process wiring (embedded server, generation)."""
