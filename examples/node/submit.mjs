#!/usr/bin/env node
// Submit one task to Drover over the durable path and wait for its outcome.
//
// Publishes a JSON task to `<prefix>.submit.<queue>` with JetStream (Nats-Msg-Id = the task id,
// so a retried publish is not run twice), then watches the task's key in the `<prefix>-tasks`
// KV bucket (no polling) until the record is terminal, and prints it.
//
//   npm install
//   node submit.mjs --type echo --payload '{"hello":"drover"}' --timeout 60
//
// Exit codes: 0 succeeded, 1 failed / cancelled / upstream_failed, 2 bad arguments,
// 3 NATS unreachable or timed out.

import { connect, headers } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { parseArgs } from "node:util";
import { randomBytes } from "node:crypto";

const TERMINAL = new Set(["succeeded", "failed", "cancelled", "upstream_failed"]);

/** The partition a keyed task goes to (docs/protocol.md, section 6). */
export function partition(key, p) {
  let h = 0x811c9dc5;
  for (const b of new TextEncoder().encode(key)) h = Math.imul(h ^ b, 0x01000193) >>> 0;
  return h % p;
}

function fail(code, message) {
  console.error(`error: ${message}`);
  process.exit(code);
}

const { values: args } = parseArgs({
  options: {
    "nats-url": { type: "string", default: "nats://127.0.0.1:4222" },
    prefix: { type: "string", default: "drover" },
    queue: { type: "string", default: "default" },
    type: { type: "string", default: "echo" },
    payload: { type: "string", default: '{"hello":"drover"}' },
    id: { type: "string" },
    key: { type: "string" },
    timeout: { type: "string", default: "60" },
  },
});

let payload;
try {
  payload = JSON.parse(args.payload);
} catch (e) {
  fail(2, `--payload is not valid JSON: ${e.message}`);
}
const timeoutMs = Number(args.timeout) * 1000;
if (!(timeoutMs > 0)) fail(2, "--timeout must be a positive number of seconds");
const id = args.id ?? `js-${randomBytes(8).toString("hex")}`;
const task = { id, type: args.type, payload };
if (args.key) task.key = args.key;

let nc;
try {
  nc = await connect({ servers: args["nats-url"].split(","), timeout: 5000, maxReconnectAttempts: 0 });
} catch (e) {
  fail(3, `cannot connect to NATS at ${args["nats-url"]}: ${e.message}`);
}

let code = 0;
try {
  const js = jetstream(nc);
  const subject = `${args.prefix}.submit.${args.queue}`;
  const h = headers();
  h.set("Nats-Msg-Id", id);
  const ack = await js.publish(subject, JSON.stringify(task), { headers: h });
  const note = ack.duplicate ? " (duplicate: submitted before)" : "";
  console.log(`submitted ${id} to ${subject}: durable in ${ack.stream} at seq ${ack.seq}${note}`);
  if (args.key) console.log(`key "${args.key}" goes to partition ${partition(args.key, 64)} of 64`);

  const kv = await new Kvm(js).open(`${args.prefix}-tasks`);
  // The watch delivers the key's current value first, then every update.
  const watch = await kv.watch({ key: id });
  const timer = setTimeout(() => watch.stop(), timeoutMs);
  let record = null;
  for await (const e of watch) {
    if (e.operation !== "PUT") continue;
    const r = e.json();
    console.log(`state ${r.state}`);
    if (TERMINAL.has(r.state)) {
      record = r;
      break;
    }
  }
  clearTimeout(timer);
  watch.stop();
  if (record === null) {
    console.error(`error: task ${id} not finished within ${args.timeout}s`);
    code = 3;
  } else {
    console.log(JSON.stringify(record, null, 2));
    code = record.state === "succeeded" ? 0 : 1;
  }
} catch (e) {
  console.error(`error: ${e.message}`);
  code = 3;
} finally {
  await nc.close();
}
process.exit(code);
