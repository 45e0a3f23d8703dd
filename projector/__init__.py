"""The projector: the only writer of the ``cluster_state`` KV bucket (see README.md here)."""
