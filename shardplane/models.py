"""`shardplane models` and `shardplane generate`: list the model catalog; place a runnable
model and generate through its pipeline.

Why together: both are about the models themselves (what can be placed, and running one end
to end), client-side commands that start no service."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError

from shardplane.bus import subjects
from shardplane.bus.ids import slug
from shardplane.placing import request_with_retry
from shardplane.wiring import connect_briefly, run_command


def models(args: argparse.Namespace) -> int:
    from shardplane.planner.catalog import CATALOG, catalog_table
    from shardplane.planner.profile import card_params, profile_from_card

    if not args.json:
        print(catalog_table())
        return 0
    rows: list[dict[str, Any]] = []
    for c in CATALOG.values():
        profile = profile_from_card(c)
        row: dict[str, Any] = msgspec.to_builtins(c)
        # The table's derived columns, in base units.
        row["params"] = card_params(c)
        row["weight_bytes"] = profile.weight_bytes
        row["kv_bytes_per_token"] = sum(profile.kv_bytes_per_token)
        rows.append(row)
    print(json.dumps(rows, indent=2))
    return 0


def _generate_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "context_tokens": args.context_tokens,
        "instance_id": args.instance_id or "gen-" + slug(args.model, 40),
        "objective": getattr(args, "objective", "throughput"),
    }
    if args.min_stages is not None:
        body["min_stages"] = args.min_stages
    return body


async def run_generation(
    nc: Client, args: argparse.Namespace, *, stream: bool, timeout: float = 30.0
) -> Any:
    """Place (or re-place) the model, then generate; returns ``shardplane.generate.Outcome``."""
    from shardplane.generate import GenerateError, Sampling, TextCodec, generate

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise GenerateError(
            f"--max-new-tokens must be >= 1 (got {args.max_new_tokens}), --temperature >= 0 "
            f"(got {args.temperature:g}), --top-p in (0, 1] (got {args.top_p:g})"
        )
    # Reading a packaged model's tokenizer takes seconds (~2.4 s here): off the loop, which
    # the demo shares with every service (a blocked loop cost the projector its lease).
    text = await asyncio.to_thread(TextCodec, args.model)
    if args.token_ids is not None:
        try:
            prompt = [int(t) for t in args.token_ids.split(",") if t.strip()]
        except ValueError:
            raise GenerateError(
                f"--token-ids must be integers separated by commas: {args.token_ids!r}"
            ) from None
    else:
        prompt = text.encode(args.prompt)
    if not prompt:
        raise GenerateError("the prompt has no tokens")
    reply = await request_with_retry(nc, _generate_body(args), timeout)
    if not reply.ok:
        raise GenerateError(
            f"placement failed: {reply.error.message if reply.error else reply.status}"
        )
    if args.min_stages and len(reply.stages) < args.min_stages:
        # A planner that predates min_stages ignores it; say so rather than pretend.
        print(
            f"note: the planner placed {len(reply.stages)} stage(s) although --min-stages "
            f"{args.min_stages} was asked (this planner does not honour min_stages)",
            file=sys.stderr,
        )
    if stream:
        where = ", ".join(f"{s.device} [{s.layer_start},{s.layer_end})" for s in reply.stages)
        print(
            f"{reply.instance_id}: {len(reply.stages)} stage(s): {where}",
            file=sys.stderr,
            flush=True,
        )
    decoded: list[int] = []
    shown = ""

    def show(tokens: list[int]) -> None:
        nonlocal shown
        decoded.extend(tokens)
        now = text.decode(decoded)
        piece = now[len(shown) :] if now is not None else " ".join(map(str, tokens)) + " "
        shown = now if now is not None else shown
        print(piece, end="", flush=True)

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    on_tokens = show if stream else None
    out = await generate(nc, reply, prompt, sampling, stop_ids=text.eos, on_tokens=on_tokens)
    out.text = text.decode(out.token_ids)
    return out


def generate(args: argparse.Namespace) -> int:
    from shardplane.generate import GenerateError, json_line, summary

    async def main() -> int:
        nc = await connect_briefly(args, "shardplane-generate")
        try:
            out = await run_generation(nc, args, stream=not args.json, timeout=args.timeout)
        except GenerateError as exc:
            print(f"\nshardplane: {exc}", file=sys.stderr)
            return 1
        except NoRespondersError:
            print(
                f"shardplane: no planner answers on {subjects.PLACEMENT_REQUEST}", file=sys.stderr
            )
            return 1
        except TimeoutError:
            print(
                f"shardplane: the planner did not answer within {args.timeout:g} s", file=sys.stderr
            )
            return 1
        finally:
            await nc.close()
        if args.json:
            print(json_line(out))
        else:
            print()
            print(summary(out))
        return 0

    return run_command(main)
