"""Node agents: GPU backends (NVML, ROCm SMI, simulated fleet), the telemetry collector, and the
shard worker. The agent is the only part of shardplane that touches hardware."""

from shardplane import __version__ as AGENT_VERSION

__all__ = ["AGENT_VERSION"]
