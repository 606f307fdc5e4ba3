#!/usr/bin/env node
// One-shot nats.js (Node) check of the CIM's JetStream cluster, certificate verification on:
// connect (TLS, user/password), stream info, publish one CIM event, read it back through an
// ordered (ephemeral) consumer. Prints ONE JSON line and exits 0 only when everything worked.
//
//   NATS_URL       comma-separated server URLs (tls://nats-1.example:4222,...): give NAMES that the
//                  certificates carry; with bare IPs Node checks the certificate against "localhost"
//   NATS_USER, NATS_PASSWORD
//   NATS_CA        the cluster's CA certificate (PEM)
//   NATS_STREAM    default INFRASTRUCTURE_EVENTS
//   NATS_TLS_SERVERNAME  optional: the name to verify every server against (and to send as SNI),
//                  for IP URLs when every certificate carries that one shared name
//   NATS_CHECK_TIMEOUT_MS  hard overall limit, default 15000
//
//   node cim-check.mjs                 the full check
//   node cim-check.mjs --connect-only  connect, print the server's INFO, close
import { randomUUID } from "node:crypto";
import { connect } from "@nats-io/transport-node";
import { DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";

const connectOnly = process.argv.includes("--connect-only");
const env = process.env;
const stream = env.NATS_STREAM || "INFRASTRUCTURE_EVENTS";
const overallMs = Number(env.NATS_CHECK_TIMEOUT_MS || 15000);
const result = { ok: false, server: null, connected_url: null, stream, seq: null, read_back: false, error: null };
let nc = null;
let finished = false;

function finish(code) {
  if (finished) return;
  finished = true;
  process.stdout.write(`${JSON.stringify(result)}\n`);
  // Exit now: a half-open connection or reconnect timer must not keep the process alive.
  process.exit(code);
}

function describe(err) {
  if (!err) return "unknown error";
  const parts = [err.message || String(err)];
  for (let cause = err.cause; cause; cause = cause.cause) {
    if (cause.message && !parts.includes(cause.message)) parts.push(cause.message);
  }
  if (err.code) parts.push(`(${err.code})`);
  return parts.join(": ");
}

// Never hangs: whatever is pending when the limit passes, the check fails and says where it was.
let stage = "connect";
const hardTimer = setTimeout(() => {
  result.error = `timed out after ${overallMs} ms during ${stage}`;
  finish(2);
}, overallMs);

function required(name) {
  const value = env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

function envelope(aggregateId) {
  const eventId = randomUUID();
  return {
    event_id: eventId,
    aggregate_id: aggregateId,
    sequence: 1,
    timestamp: new Date().toISOString(),
    // The first event of a chain is its own correlation and cause.
    correlation_id: eventId,
    causation_id: eventId,
    event_type: "created",
    data: { kind: "compute", hostname: `cim-check-${aggregateId.slice(0, 8)}`, source: "cim-check.mjs" },
    metadata: { client: "nats.js", check: "cim-check" },
  };
}

async function main() {
  const servers = required("NATS_URL")
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  const tls = { caFile: required("NATS_CA") };
  if (env.NATS_TLS_SERVERNAME) tls.servername = env.NATS_TLS_SERVERNAME;
  const connectTimeout = Math.max(1000, Math.min(5000, Math.floor(overallMs / 3)));
  nc = await connect({
    servers,
    user: required("NATS_USER"),
    pass: required("NATS_PASSWORD"),
    tls,
    name: "cim-check.mjs",
    timeout: connectTimeout,
    // One pass over the given servers for the first connect, then fail (no waitOnFirstConnect).
    maxReconnectAttempts: 1,
  });
  result.server = {
    server_name: nc.info?.server_name,
    server_id: nc.info?.server_id,
    version: nc.info?.version,
    cluster: nc.info?.cluster,
    jetstream: nc.info?.jetstream,
    tls_required: nc.info?.tls_required,
    connect_urls: nc.info?.connect_urls,
  };
  result.connected_url = nc.getServer();
  if (connectOnly) {
    result.stream = null;
    stage = "close";
    await nc.close();
    result.ok = true;
    return;
  }

  stage = "stream info";
  const jsm = await jetstreamManager(nc, { timeout: 5000 });
  await jsm.streams.info(stream);

  stage = "publish";
  const js = jetstream(nc, { timeout: 5000 });
  const aggregateId = randomUUID();
  const subject = `infrastructure.compute.${aggregateId}.created`;
  const event = envelope(aggregateId);
  const ack = await js.publish(subject, JSON.stringify(event), { msgID: event.event_id });
  if (ack.stream !== stream) throw new Error(`published into ${ack.stream}, expected ${stream}`);
  result.seq = ack.seq;

  stage = "read back";
  const consumer = await js.consumers.get(stream, {
    filter_subjects: [subject],
    deliver_policy: DeliverPolicy.StartSequence,
    opt_start_seq: ack.seq,
    inactive_threshold: 5_000_000_000,
  });
  const msg = await consumer.next({ expires: 3000 });
  if (!msg) throw new Error(`event seq ${ack.seq} not read back within 3 s`);
  const got = msg.json();
  if (msg.subject !== subject || msg.seq !== ack.seq || got.event_id !== event.event_id) {
    throw new Error(`read back ${msg.subject} seq ${msg.seq} event ${got.event_id}, not what was published`);
  }
  result.read_back = true;
  // An ordered consumer is ephemeral: remove it now rather than after its inactivity threshold.
  await consumer.delete().catch(() => {});

  stage = "close";
  await nc.close();
  nc = null;
  result.ok = true;
}

main()
  .then(() => {
    clearTimeout(hardTimer);
    finish(result.ok ? 0 : 1);
  })
  .catch(async (err) => {
    clearTimeout(hardTimer);
    result.error = `${stage}: ${describe(err)}`;
    if (nc) await Promise.race([nc.close().catch(() => {}), new Promise((r) => setTimeout(r, 1000))]);
    finish(1);
  });
