"""shardplane: the command line and the process wiring around the components."""

from shardplane.bus import VERSION as __version__

__all__ = ["__version__"]
