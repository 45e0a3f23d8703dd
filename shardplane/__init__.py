"""shardplane: the command line and the process wiring around the components."""

from shardplane.bus import VERSION

__version__ = VERSION
