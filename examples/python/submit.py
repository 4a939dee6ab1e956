#!/usr/bin/env python3
"""Submit one task to Drover over the durable path and wait for its outcome.

Publishes a JSON task to `<prefix>.submit.<queue>` with JetStream (Nats-Msg-Id = the task id,
so a retried publish is not run twice), then watches the task's key in the `<prefix>-tasks`
KV bucket (no polling) until the record reaches a terminal state, and prints it.

    pip install -r requirements.txt
    python3 submit.py --type echo --payload '{"hello":"drover"}' --timeout 60

Exit codes: 0 succeeded, 1 failed / cancelled / upstream_failed, 2 bad arguments,
3 NATS unreachable or timed out.
"""

import argparse
import asyncio
import json
import sys
import uuid

import nats
from nats.errors import NoServersError, TimeoutError as NatsTimeout

TERMINAL = {"succeeded", "failed", "cancelled", "upstream_failed"}


def fnv1a32_partition(key: str, partitions: int) -> int:
    """The partition a keyed task goes to (docs/protocol.md, section 6)."""
    h = 0x811C9DC5
    for b in key.encode("utf-8"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


async def watch_until_terminal(kv, task_id: str, timeout: float, on_state):
    """Yield nothing; return the terminal record, or raise asyncio.TimeoutError."""
    # The default watch delivers the key's current value first, then every update.
    watcher = await kv.watch(task_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError
            try:
                entry = await watcher.updates(timeout=left)
            except NatsTimeout:
                raise asyncio.TimeoutError from None
            if entry is None or entry.value is None or entry.operation in ("DEL", "PURGE"):
                continue  # the "caught up" marker, or no record (yet)
            record = json.loads(entry.value)
            on_state(record["state"])
            if record["state"] in TERMINAL:
                return record
    finally:
        await watcher.stop()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    ap.add_argument("--prefix", default="drover")
    ap.add_argument("--queue", default="default")
    ap.add_argument("--type", default="echo", dest="task_type")
    ap.add_argument("--payload", default='{"hello":"drover"}', help="JSON")
    ap.add_argument("--id", default=None, help="task id (default: a random one)")
    ap.add_argument("--key", default=None, help="affinity/ordering key")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the outcome")
    args = ap.parse_args()

    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as e:
        print(f"error: --payload is not valid JSON: {e}", file=sys.stderr)
        return 2
    task_id = args.id or f"py-{uuid.uuid4().hex[:16]}"
    task = {"id": task_id, "type": args.task_type, "payload": payload}
    if args.key:
        task["key"] = args.key

    try:
        nc = await nats.connect(args.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    except (NoServersError, OSError, NatsTimeout) as e:
        print(f"error: cannot connect to NATS at {args.nats_url}: {e}", file=sys.stderr)
        return 3
    try:
        js = nc.jetstream()
        subject = f"{args.prefix}.submit.{args.queue}"
        ack = await js.publish(
            subject, json.dumps(task).encode(), headers={"Nats-Msg-Id": task_id}, timeout=5
        )
        note = " (duplicate: submitted before)" if ack.duplicate else ""
        print(f"submitted {task_id} to {subject}: durable in {ack.stream} at seq {ack.seq}{note}")
        if args.key:
            print(f"key {args.key!r} goes to partition {fnv1a32_partition(args.key, 64)} of 64")

        kv = await js.key_value(f"{args.prefix}-tasks")
        record = await watch_until_terminal(
            kv, task_id, args.timeout, lambda s: print(f"state {s}", flush=True)
        )
        print(json.dumps(record, indent=2))
        return 0 if record["state"] == "succeeded" else 1
    except asyncio.TimeoutError:
        print(f"error: task {task_id} not finished within {args.timeout:g}s", file=sys.stderr)
        return 3
    except NatsTimeout as e:
        print(f"error: NATS did not answer in time: {e}", file=sys.stderr)
        return 3
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
