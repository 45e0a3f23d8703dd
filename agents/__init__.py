"""Node agents: GPU backends (NVML, ROCm SMI, simulated fleet), the telemetry collector, and the
shard worker. The agent is the only part of shardplane that touches hardware."""

from shardplane.bus import VERSION as AGENT_VERSION

__all__ = ["AGENT_VERSION"]
