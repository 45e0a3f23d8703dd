"""The planner service: answers ``placement.request`` through the NATS service API.

A thin async shell: a watch-fed cache of the ``cluster_state`` KV bucket (no scan per request),
the memory ledger's compare-and-set loop, and JetStream publishes of the assignments. Planning
itself is pure (``planner.plan``) and runs in a worker thread, so PING/INFO/STATS and the cache
keep flowing while CP-SAT works.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from nats.micro import add_service  # pyright: ignore[reportUnknownVariableType]
from nats.micro.request import Request

from shardplane.bus import codec, keys, subjects
from shardplane.bus.codec import DecodeError
from shardplane.bus.ids import slug
from shardplane.bus.kvfeed import FeedEnded, KvFeed, Update
from shardplane.bus.liveness import judge_device, ttl_from_env
from shardplane.bus.messages import (
    EXCLUDED_LISTED,
    DeviceState,
    ErrorCode,
    ErrorInfo,
    Excluded,
    InstanceState,
    NodeState,
    PlacementReply,
    PlacementRequest,
    ReleaseReply,
    ReleaseRequest,
    ShardAssignment,
    Stage,
)
from shardplane.bus.retry import retrying
from shardplane.bus.streams import CLUSTER_STATE, LEDGER, kv_stream, provision
from shardplane.bus.watchguard import guard_watch
from shardplane.planner import ledger, lifecycle
from shardplane.planner.catalog import UnknownModel, resolve
from shardplane.planner.cost import Problem
from shardplane.planner.fleet import Fleet, build_fleet
from shardplane.planner.hf import CheckpointError
from shardplane.planner.moves import HEAL, MOVES_BUDGET_S, bytes_moved, keep_resident
from shardplane.planner.plan import Outcome, PlanError, plan
from shardplane.planner.profile import ModelProfile

log = logging.getLogger(__name__)

SERVICE_NAME = "shardplane-planner"
SERVICE_VERSION = "0.1.0"
MAX_COMMIT_ATTEMPTS = 50
# The longest the watch applies changes before letting requests in (thousands a second).
APPLY_SLICE_S = 0.005
# StateCache.reached looks this often: a watch applies a change in microseconds, and a caller
# waits on it only to confirm a fault before acting (a few times a minute at most).
CATCH_UP_POLL_S = 0.01
PLAN_GRACE_S = 20.0  # beyond the solver's own time limit before a request answers "timeout"

ERROR_STATUS = {
    "invalid_request": "400",
    "unknown_model": "404",
    "conflict": "409",
    "insufficient_memory": "507",
    "no_devices": "503",
    "timeout": "504",
    "internal": "500",
    "not_found": "404",
}


@dataclass
class StateCache:
    """The newest value of every ``cluster_state`` key, kept current by a KV watch."""

    devices: dict[str, DeviceState] = field(default_factory=dict[str, DeviceState])  # by device ref
    nodes: dict[str, NodeState] = field(default_factory=dict[str, NodeState])
    instances: dict[str, InstanceState] = field(default_factory=dict[str, InstanceState])
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    revision: int = 0

    def apply(self, key: str, value: bytes | None, revision: int, deleted: bool) -> None:
        """Fold one KV entry in; idempotent (a watch may repeat entries)."""
        self.revision = max(self.revision, revision)
        kind, _, rest = key.partition(".")
        try:
            if kind == keys.DEVICES:
                node, _, index = rest.rpartition(".")
                ref = f"{node}/{index}"
                if deleted or not value:
                    self.devices.pop(ref, None)
                else:
                    self.devices[ref] = codec.decode(DeviceState, value)
            elif kind == keys.NODES:
                if deleted or not value:
                    self.nodes.pop(rest, None)
                else:
                    self.nodes[rest] = codec.decode(NodeState, value)
            elif kind == keys.INSTANCES:
                if deleted or not value:
                    self.instances.pop(rest, None)
                else:
                    self.instances[rest] = codec.decode(InstanceState, value)
        except DecodeError as exc:  # one bad value must not blind the planner to the rest
            log.warning("cluster_state %s: %s", key, exc)

    def apply_update(self, update: Update) -> None:
        self.apply(update.key, update.value, update.revision, update.deleted)

    async def reached(self, revision: int, timeout_s: float) -> bool:
        """Whether this cache has applied ``revision`` (waiting up to ``timeout_s`` for the
        watch to get there)."""
        deadline = time.monotonic() + timeout_s
        while self.revision < revision:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(CATCH_UP_POLL_S)
        return True

    def judged_devices(self) -> list[DeviceState]:
        """The devices with liveness judged on this planner's clock (bus.liveness): a device
        the projector has not rewritten for a TTL is not placed on as if it were online."""
        now, ttl = time.time(), ttl_from_env()
        return [
            judge_device(d, self.nodes.get(d.sample.node), now, ttl) for d in self.devices.values()
        ]

    async def follow(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        """Apply the bucket's changes until ``stop``; a watch that ends or stalls (its server
        lost: bus.watchguard) is started again, and its replay brings the cache up to date."""
        watching: list[KvFeed] = []

        async def restart() -> None:
            if watching:
                await watching[0].stop()

        guard = asyncio.create_task(
            guard_watch(
                js, kv_stream(CLUSTER_STATE), lambda: self.revision, restart, what="planner"
            )
        )
        try:
            while not stop.is_set():
                try:
                    feed = await KvFeed.start(js, CLUSTER_STATE)
                except Exception as exc:  # an election: try again shortly
                    log.warning("cluster_state watch could not start (%r); retrying", exc)
                    await asyncio.sleep(0.5)
                    continue
                watching[:] = [feed]
                try:  # ``ready`` is set at the marker: every key's initial value is in
                    await feed.drain(
                        self.apply_update, self.ready.set, slice_s=APPLY_SLICE_S, stop=stop
                    )
                except FeedEnded:
                    pass  # stopped by the guard: watch again
                finally:
                    await feed.stop()
        finally:
            guard.cancel()


def _error(code: ErrorCode, message: str) -> PlacementReply:
    return PlacementReply(ok=False, error=ErrorInfo(code=code, message=message))


def _model_name(req: PlacementRequest) -> str:
    return req.model if isinstance(req.model, str) else req.model.name


def new_instance_id(model: str) -> str:
    base = slug(model.removeprefix("hf:").rstrip("/").rsplit("/", 1)[-1], limit=48)
    return f"{base}-{secrets.token_hex(3)}"


class Planner:
    """Request handling; one instance per service (tests drive ``handle`` directly too)."""

    def __init__(
        self, nc: Client, js: JetStreamContext, cache: StateCache, ledger_kv: KeyValue
    ) -> None:
        self.nc = nc
        self.js = js
        self.cache = cache
        self.ledger_kv = ledger_kv
        self._profiles: dict[str, ModelProfile] = {}

    # -- I/O helpers ---------------------------------------------------------------------------

    async def _profile(self, req: PlacementRequest) -> ModelProfile:
        if isinstance(req.model, str) and not req.model.startswith("hf:"):
            if (hit := self._profiles.get(req.model)) is None:
                hit = resolve(req.model)
                self._profiles[req.model] = hit
            return hit
        # Checkpoints are read from disk (headers only); keep that off the event loop.
        return await asyncio.to_thread(resolve, req.model)

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        """JetStream publish with our own retries through a leader election: nats-py does not
        retry a publish that got no answer, and the same Nats-Msg-Id makes a retry safe."""
        await retrying(
            lambda: self.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id}, timeout=2.0),
            f"publish {subject}",
        )

    async def _put_plan(self, key: str, body: bytes) -> None:
        await retrying(lambda: self.ledger_kv.put(key, body), "ledger plan write")

    async def _fleet(
        self, req: PlacementRequest, promised: dict[str, int], own: frozenset[str] = frozenset()
    ) -> Fleet:
        """The candidates, built in a worker thread from a copy of the cache taken here (the
        watch keeps changing the cache on this loop; at 8,000 GPUs building took the loop
        ~0.1 s a request, while the watch had 4,000 updates a second to apply)."""
        devices, nodes = list(self.cache.devices.values()), dict(self.cache.nodes)
        now, ttl = time.time(), ttl_from_env()

        def build() -> Fleet:
            judged = (judge_device(d, nodes.get(d.sample.node), now, ttl) for d in devices)
            return build_fleet(
                judged, nodes, exclude_nodes=req.exclude_nodes, promised=promised, own=own
            )

        return await asyncio.to_thread(build)

    def instance_ready(self, instance_id: str, generation: int) -> bool:
        """Every stage of ``generation`` loaded or reserved, as the KV shows it."""
        state = self.cache.instances.get(instance_id)
        return (
            state is not None
            and state.generation == generation
            and len(state.stages) == state.stage_count
            and all(s.state in ledger.MATERIALISED for s in state.stages)
        )

    async def _own_stages(self, previous: ledger.LedgerEntry) -> tuple[Stage, ...]:
        """The stages the instance holds now (its stored reply): its own load on those devices
        must not count against them, and a heal keeps what it can of them."""
        stored = await ledger.stored_reply(self.ledger_kv, previous.plan_key)
        return stored.stages if stored is not None else ()

    # -- the request ---------------------------------------------------------------------------

    async def handle(self, req: PlacementRequest) -> PlacementReply:
        """Plan (and unless dry_run reserve and publish) one request; never raises. An error
        reply names the request's instance id (when it gave one) and model."""
        reply = await self._handle_or_error(req)
        if reply.ok:
            return reply
        return msgspec.structs.replace(
            reply,
            instance_id=reply.instance_id or req.instance_id,
            model=reply.model or _model_name(req),
            context_tokens=reply.context_tokens or req.context_tokens,
            batch=reply.batch or req.batch,
            objective=req.objective,
            dry_run=req.dry_run,
        )

    async def _handle_or_error(self, req: PlacementRequest) -> PlacementReply:
        try:
            return await self._handle(req)
        except PlanError as exc:
            return _error(exc.code, exc.message)
        except UnknownModel as exc:
            return _error("unknown_model", str(exc))
        except CheckpointError as exc:
            return _error("invalid_request", str(exc))
        except Exception as exc:  # the planner must outlive any one bad request
            log.exception("placement request failed")
            return _error("internal", f"{type(exc).__name__}: {exc}")

    async def _handle(self, req: PlacementRequest) -> PlacementReply:
        if not self.cache.ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.cache.ready.wait(), timeout=5.0)
        profile = await self._profile(req)
        if not self.cache.devices:
            raise PlanError(
                "no_devices",
                "no devices in cluster_state (is the projector running and are agents reporting?)",
            )
        model = _model_name(req)
        fp = ledger.fingerprint(req)
        instance_id = req.instance_id or new_instance_id(model)

        for _attempt in range(MAX_COMMIT_ATTEMPTS):
            doc, revision = await ledger.read(self.ledger_kv)
            previous = doc.instances.get(instance_id) if req.instance_id else None
            live = previous is not None and not previous.released
            if live and previous is not None and previous.fingerprint == fp and not req.dry_run:
                same = None if req.heal else await self._same_plan(previous)
                if same is not None:
                    if not previous.published:  # a failed or interrupted publish: finish it
                        await self.publish_generation(
                            same, previous.release_nodes, previous.plan_key
                        )
                        await ledger.mark_published(self.ledger_kv, instance_id, same.generation)
                    return same
            promised = ledger.promised_bytes(
                doc,
                exclude_instance=instance_id if previous is not None else None,
                instances=self.cache.instances,
                devices=self.cache.devices,
            )
            own = await self._own_stages(previous) if live and previous is not None else ()
            fleet = await self._fleet(req, promised, own=frozenset(st.device for st in own))
            problem = Problem(
                profile=profile,
                fleet=fleet,
                context_tokens=req.context_tokens,
                batch=req.batch,
                headroom=req.memory_headroom,
                objective=req.objective,
                max_stages=req.max_stages,
                microbatches=req.microbatches,
                min_stages=req.min_stages,
            )
            limit = HEAL.phase1_limit(req.time_limit_s) if req.heal else req.time_limit_s
            try:
                # The solver bounds itself; this only catches a planner stuck far beyond that.
                outcome = await asyncio.wait_for(
                    asyncio.to_thread(plan, problem, time_limit_s=limit, method=req.solver),
                    timeout=(req.time_limit_s or 2.0) + PLAN_GRACE_S,
                )
            except TimeoutError as exc:
                raise PlanError(
                    "timeout",
                    f"planning {len(fleet.devices)} devices x {profile.layers} layers took over "
                    f"{(req.time_limit_s or 2.0) + PLAN_GRACE_S:.0f} s",
                ) from exc
            except PlanError as exc:
                if fleet.excluded:
                    exc.message += "; excluded: " + ", ".join(
                        f"{d} ({r})" for d, r in fleet.excluded[:8]
                    )
                raise
            if own:  # re-placing a live instance: phase 2 keeps what is loaded where it can
                # A CP-SAT solve, off the event loop; a heal's within moves.HEAL (its instance
                # may be down while it plans).
                budget = HEAL.phase2(outcome.solve_ms / 1e3) if req.heal else MOVES_BUDGET_S
                outcome = await asyncio.to_thread(
                    keep_resident, problem, outcome, own, req.move_slack, budget
                )
            generation = (previous.generation + 1) if previous is not None else 1
            reply = self._reply(req, instance_id, generation, model, outcome, fleet)
            if own or req.heal:
                moved, kept = bytes_moved(own, reply.stages)
                reply = msgspec.structs.replace(reply, bytes_moved=moved, bytes_kept=kept)
            if req.dry_run:
                return msgspec.structs.replace(reply, generation=0)
            key = ledger.plan_key(instance_id, generation, secrets.token_hex(4))
            nodes = tuple(dict.fromkeys(s.node for s in outcome.stages))
            # Committed unpublished: the ledger owns the generation before anyone acts on it.
            entry = ledger.LedgerEntry(
                generation=generation,
                model=model,
                fingerprint=fp,
                devices=_promise(outcome),
                nodes=nodes,
                ts=time.time(),
                plan_key=key,
                published=False,
                # A heal makes before it breaks: the nodes it leaves keep serving until the
                # new generation is loaded (lifecycle.release_deferred).
                release_nodes=() if req.heal else _dropped(previous, nodes),
                deferred_releases=_dropped(previous, nodes) if req.heal else (),
                request=msgspec.structs.replace(req, instance_id=instance_id, heal=False),
            )
            instances = dict(doc.instances)
            instances[instance_id] = entry
            await self._put_plan(key, codec.encode(reply))
            try:
                await ledger.commit(self.ledger_kv, ledger.LedgerDoc(instances=instances), revision)
            except KeyWrongLastSequenceError:
                # Another planner committed first: plan again against its promises.
                with contextlib.suppress(Exception):
                    await self.ledger_kv.purge(key)
                await asyncio.sleep(secrets.randbelow(5) / 1000.0)
                continue
            if previous is not None and previous.plan_key:
                with contextlib.suppress(Exception):
                    await self.ledger_kv.purge(previous.plan_key)
            try:
                await self.publish_generation(reply, entry.release_nodes, key)
            except Exception as exc:
                log.warning("publishing %s generation %d failed: %r", instance_id, generation, exc)
                raise PlanError(
                    "internal",
                    f"generation {generation} of {instance_id} is committed in the ledger but "
                    f"its assignments were not all published ({type(exc).__name__}: {exc}); "
                    "the planner keeps retrying the publish, and re-sending this request "
                    "retries it at once",
                ) from exc
            await ledger.mark_published(self.ledger_kv, instance_id, generation)
            return reply
        raise PlanError(
            "conflict", f"the ledger changed under {MAX_COMMIT_ATTEMPTS} attempts in a row; retry"
        )

    async def _same_plan(self, previous: ledger.LedgerEntry) -> PlacementReply | None:
        """The stored reply of an unchanged instance whose devices are all still usable."""
        stored = await ledger.stored_reply(self.ledger_kv, previous.plan_key)
        if stored is None or stored.generation != previous.generation:
            return None
        devices = {f"{d.sample.node}/{d.sample.index}": d for d in self.cache.judged_devices()}
        for s in stored.stages:
            state = devices.get(s.device)
            if state is None or not state.online or not state.sample.present:
                return None
        return stored

    def _reply(
        self,
        req: PlacementRequest,
        instance_id: str,
        generation: int,
        model: str,
        outcome: Outcome,
        fleet: Fleet,
    ) -> PlacementReply:
        ev = outcome.evaluation
        return PlacementReply(
            ok=True,
            instance_id=instance_id,
            generation=generation,
            model=model,
            solver=outcome.solver,
            status=outcome.status,
            solve_ms=round(outcome.solve_ms, 3),
            bottleneck_ms=ev.bottleneck_ms,
            lower_bound_ms=outcome.lower_bound_ms,
            tokens_per_s=ev.tokens_per_s,
            microbatches=ev.microbatches,
            step_ms=ev.step_ms,
            max_batch=outcome.max_batch,
            objective=req.objective,
            context_tokens=req.context_tokens,
            batch=req.batch,
            dry_run=req.dry_run,
            stages=outcome.stages,
            excluded=tuple(
                Excluded(device=d, reason=r) for d, r in fleet.excluded[:EXCLUDED_LISTED]
            ),
            excluded_total=len(fleet.excluded),
            gap_pct=outcome.gap_pct,
            bound_ms=outcome.bound_ms,
        )

    async def publish_generation(
        self, reply: PlacementReply, release_nodes: tuple[str, ...], plan_key: str
    ) -> None:
        """Publish a committed generation: a stage assignment per stage and a release for each
        node that held the instance before and holds nothing now. Msg-Ids are the generation's
        own, so publishing it again (repair, re-send) stores nothing twice."""
        assert reply.instance_id is not None and reply.model is not None
        now = time.time()
        count = len(reply.stages)
        total = reply.stages[-1].layer_end if reply.stages else 0
        jobs: list[Any] = []
        for i, s in enumerate(reply.stages):
            msg = ShardAssignment(
                instance_id=reply.instance_id,
                generation=reply.generation,
                node=s.node,
                model=reply.model,
                stage=i,
                stage_count=count,
                device=s.device,
                layer_start=s.layer_start,
                layer_end=s.layer_end,
                layers_total=total,
                weight_bytes=s.weight_bytes,
                kv_bytes=s.kv_bytes,
                memory_bytes=s.memory_bytes,
                embeddings=s.embeddings,
                head=s.head,
                ts=now,
                plan_key=plan_key,
            )
            jobs.append(
                self.publish(
                    subjects.assigned(s.node),
                    codec.encode(msg),
                    f"{reply.instance_id}-g{reply.generation}-s{i}",
                )
            )
        holding = {s.node for s in reply.stages}
        for node in release_nodes:
            if node in holding:
                continue
            msg = ShardAssignment(
                instance_id=reply.instance_id,
                generation=reply.generation,
                node=node,
                model=reply.model,
                stage_count=max(1, count),
                layers_total=total,
                release=True,
                ts=now,
                plan_key=plan_key,
            )
            jobs.append(
                self.publish(
                    subjects.assigned(node),
                    codec.encode(msg),
                    f"{reply.instance_id}-g{reply.generation}-release-{node}",
                )
            )
        await asyncio.gather(*jobs)

    # -- the wire ------------------------------------------------------------------------------

    async def on_release(self, request: Request) -> None:
        """``placement.release``: JSON or MessagePack in, the same encoding out."""
        data = request.data
        encoding = codec.sniff_encoding(data, (request.headers or {}).get("Content-Type"))
        try:
            req = codec.decode(ReleaseRequest, data, encoding)
        except DecodeError as exc:
            reply = ReleaseReply(
                ok=False, error=ErrorInfo(code="invalid_request", message=str(exc))
            )
        else:
            reply = await lifecycle.release(self, req.instance_id)
        await _respond(request, codec.encode(reply, encoding), reply.ok, reply.error)

    async def on_request(self, request: Request) -> None:
        data = request.data
        headers = request.headers or {}
        encoding = codec.sniff_encoding(data, headers.get("Content-Type"))
        try:
            req = codec.decode(PlacementRequest, data, encoding)
        except DecodeError as exc:
            ident, model = codec.peek_identity(data, encoding)
            reply = msgspec.structs.replace(
                _error("invalid_request", str(exc)), instance_id=ident, model=model
            )
        else:
            reply = await self.handle(req)
        await _respond(request, codec.encode(reply, encoding), reply.ok, reply.error)


def _warm_solver() -> None:
    import shardplane.planner.solver  # noqa: F401  # pyright: ignore[reportUnusedImport]


def _dropped(previous: ledger.LedgerEntry | None, nodes: tuple[str, ...]) -> tuple[str, ...]:
    """Nodes that held the instance and hold none of its new generation: they get a release
    (with the releases the previous generation still owed: it never got to send them)."""
    if previous is None or previous.released:
        return ()
    held = (*previous.nodes, *previous.deferred_releases)
    return tuple(n for n in dict.fromkeys(held) if n not in nodes)


def _promise(outcome: Outcome) -> dict[str, int]:
    return {s.device: s.memory_bytes for s in outcome.stages}


async def _respond(request: Request, body: bytes, ok: bool, error: ErrorInfo | None) -> None:
    """A reply in the caller's encoding; an error also as the service API's error headers."""
    if ok or error is None:
        await request.respond(body)
        return
    await request.respond_error(
        ERROR_STATUS.get(error.code, "500"), f"{error.code}: {error.message}"[:1024], data=body
    )


def endpoint_data(cache: StateCache) -> dict[str, int]:
    """The ``data`` of each endpoint in ``$SRV.STATS``: the fleet the planner plans on. An
    object, never null: micro v1 stats schemas before September 2023 (still in older nats
    CLIs) require one, and a monitor wants to see a planner that sees no devices."""
    return {
        "devices": len(cache.devices),
        "devices_online": sum(1 for d in cache.devices.values() if d.online),
        "nodes": len(cache.nodes),
    }


def _stats_data(cache: StateCache, endpoint: object) -> dict[str, int]:
    del endpoint  # every endpoint (there is one) plans on the same fleet
    return endpoint_data(cache)


async def _background(planner: Planner, halt: asyncio.Event) -> None:
    """The state cache's watch and the ledger's repair pass, until ``halt``."""
    await asyncio.gather(
        planner.cache.follow(planner.js, halt), lifecycle.repair_loop(planner, halt)
    )


async def start_planner(nc: Client) -> tuple[Planner, Any, asyncio.Task[None], asyncio.Event]:
    """Provision, start the cache and the service; returns what ``run_planner`` tears down."""
    js = nc.jetstream()
    await provision(js)
    ledger_kv = await js.key_value(LEDGER)
    cache = StateCache()
    halt = asyncio.Event()
    planner = Planner(nc, js, cache, ledger_kv)
    follower = asyncio.create_task(_background(planner, halt))
    service = await add_service(
        nc,
        name=SERVICE_NAME,
        version=SERVICE_VERSION,
        description="places LLM shards on the GPU fleet (CP-SAT)",
        metadata={"subject": subjects.PLACEMENT_REQUEST, "encodings": "json,msgpack"},
        stats_handler=functools.partial(_stats_data, cache),
    )
    # Import ortools (about 0.25 s, more on a busy machine) in the background once the service
    # answers, so start-up stays fast and the first heterogeneous request does not pay for it.
    asyncio.get_running_loop().run_in_executor(None, _warm_solver)
    await service.add_endpoint(
        name="request",
        subject=subjects.PLACEMENT_REQUEST,
        handler=planner.on_request,
        metadata={},
    )
    await service.add_endpoint(
        name="release",
        subject=subjects.PLACEMENT_RELEASE,
        handler=planner.on_release,
        metadata={},
    )
    return planner, service, follower, halt


async def run_planner(nc: Client, *, stop: asyncio.Event) -> None:
    """Serve ``placement.request`` until ``stop`` is set."""
    planner, service, follower, halt = await start_planner(nc)
    del planner
    log.info("planner serving %s", subjects.PLACEMENT_REQUEST)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await service.stop()
        halt.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(follower, timeout=3.0)
