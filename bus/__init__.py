"""The bus contract shared by every shardplane component: ids, subjects, messages, streams."""

SCHEMA_VERSION = 1
