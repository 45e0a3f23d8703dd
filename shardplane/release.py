"""`shardplane release ID`: give a placed instance's memory back, over ``placement.release``.

Its own module (not commands.py) so the lifecycle command stays apart from the others; it
follows their conventions: ``--connect-timeout``, ``--json``, exit 1 with the reason.
"""

from __future__ import annotations

import argparse
import sys

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from shardplane.bus import codec, subjects
from shardplane.bus.messages import ReleaseReply, ReleaseRequest
from shardplane.wiring import connect_briefly, run_command


def describe(reply: ReleaseReply) -> str:
    if not reply.ok:
        err = reply.error
        return f"release failed: {err.code}: {err.message}" if err else "release failed"
    if reply.already:
        return f"{reply.instance_id} was already released (generation {reply.generation})"
    nodes = ", ".join(reply.nodes) or "no node"
    return (
        f"released {reply.instance_id} at generation {reply.generation}: "
        f"{reply.released_bytes / 2**30:.1f} GiB no longer promised; {nodes} told to unload"
    )


def release(args: argparse.Namespace) -> int:
    async def main() -> int:
        try:
            req = msgspec.convert({"instance_id": args.instance_id}, ReleaseRequest)
            body = codec.encode(req, "json")
        except msgspec.ValidationError as exc:
            print(f"invalid instance id: {exc}", file=sys.stderr)
            return 2
        nc = await connect_briefly(args, "shardplane-release")
        try:
            msg = await nc.request(subjects.PLACEMENT_RELEASE, body, timeout=args.timeout)
        except NoRespondersError:
            print(
                f"shardplane: no planner answers on {subjects.PLACEMENT_RELEASE} "
                "(is `shardplane planner` or `shardplane up` running against this NATS?)",
                file=sys.stderr,
            )
            return 1
        except NatsTimeoutError:
            print(
                f"shardplane: the planner did not answer within {args.timeout:g} s", file=sys.stderr
            )
            return 1
        finally:
            await nc.close()
        reply = codec.decode(ReleaseReply, msg.data, "json")
        print(msg.data.decode() if args.json else describe(reply))
        return 0 if reply.ok else 1

    return run_command(main)
