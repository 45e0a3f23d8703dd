"""The bus contract shared by every shardplane component: ids, subjects, messages, streams.

The release version lives here, not in the command-line package, so that a service (the agent
reports it in every heartbeat) can name it while importing nothing but the bus."""

SCHEMA_VERSION = 1
VERSION = "0.1.0"
