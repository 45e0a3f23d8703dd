"""shardplane: the command line and the process wiring around the components."""

__version__ = "0.1.0"
