/** Per-call options, errors and interceptors against a real server: an abort cancels the
 * call on the wire, every failure is an AvailabilityError with the caller's stack, and a
 * request id and trace context reach the server's log lines. */
import assert from "node:assert/strict";
import { AsyncLocalStorage } from "node:async_hooks";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";

import pg from "pg";

import {
  AvailabilityClient,
  AvailabilityError,
  type CallRecord,
  observe,
  requestId,
  status,
  traceContext,
} from "@halo/availability-client";
import { eventually, Serve, Stores } from "./harness";

let stores: Stores;
let serve: Serve;
let client: AvailabilityClient;

before(async () => {
  stores = await Stores.start();
  serve = new Serve(stores, { LOG_LEVEL: "DEBUG" }); // a line for every call
  await serve.start();
  client = new AvailabilityClient(serve.address);
});

after(async () => {
  await client?.close();
  await serve?.stop();
  await stores?.close();
});

const UNKNOWN = "00000000-0000-0000-0000-00000000beef";

/** Holds a mitra's row lock, so that a write of it waits in the server until released. */
async function lockMitra(mitraId: string): Promise<{ waiting: () => Promise<boolean>; release: () => Promise<void> }> {
  const holder = new pg.Client({ connectionString: stores.databaseUrl });
  await holder.connect();
  await holder.query("BEGIN");
  await holder.query("SELECT 1 FROM mitras WHERE id = $1 FOR UPDATE", [mitraId]);
  return {
    waiting: async () =>
      (await stores.sql<{ n: number }>("SELECT count(*)::int AS n FROM pg_locks WHERE NOT granted"))[0]!.n > 0,
    release: async () => {
      await holder.query("ROLLBACK");
      await holder.end();
    },
  };
}

function logLines(pattern: RegExp): string[] {
  return readFileSync(serve.logPath, "utf8")
    .split("\n")
    .filter((line) => pattern.test(line));
}

test("aborting a call cancels it on the wire: the server counts it CANCELLED", async () => {
  const mitra = await stores.mitra("Held");
  const lock = await lockMitra(mitra);
  try {
    const cancelledBefore = await serve.handled("SetMitraActive", "CANCELLED");
    const controller = new AbortController();
    const call = client.setMitraActive(mitra, false, { signal: controller.signal });
    await eventually(lock.waiting, 20_000, "the server waiting for the row lock");
    controller.abort(new Error("the HTTP request went away"));
    await assert.rejects(call, (error: AvailabilityError) => {
      assert.ok(error instanceof AvailabilityError);
      assert.equal(error.code, status.CANCELLED);
      assert.equal((error.cause as Error).message, "the HTTP request went away");
      return true;
    });
    await eventually(
      async () => (await serve.handled("SetMitraActive", "CANCELLED")) === cancelledBefore + 1,
      20_000,
      "the server's CANCELLED count",
    );
  } finally {
    await lock.release();
  }
  assert.equal((await client.getMitraStatus(mitra)).active, true, "the cancelled deactivation did not happen");
});

test("an aborted signal fails the call before it is sent", async () => {
  const handledBefore = await serve.handled("GetMitraStatus", "NOT_FOUND");
  await assert.rejects(client.getMitraStatus(UNKNOWN, { signal: AbortSignal.abort() }), { code: status.CANCELLED });
  await client.getMitraStatus(UNKNOWN).catch(() => undefined);
  assert.equal(await serve.handled("GetMitraStatus", "NOT_FOUND"), handledBefore + 1);
});

test("a call's timeoutMs ends a call the server holds: DEADLINE_EXCEEDED", async () => {
  const mitra = await stores.mitra("Slow");
  const lock = await lockMitra(mitra);
  try {
    await assert.rejects(client.setMitraActive(mitra, false, { timeoutMs: 200 }), { code: status.DEADLINE_EXCEEDED });
  } finally {
    await lock.release();
  }
});

test("a call's metadata reaches the server: its request id names the log line", async () => {
  const error = await client.getMitraStatus(UNKNOWN, { metadata: { "x-request-id": "per-call-7c1d" } }).catch((e: unknown) => e);
  assert.ok(error instanceof AvailabilityError);
  assert.equal(error.code, status.NOT_FOUND);
  assert.deepEqual(error.metadata.get("x-request-id"), ["per-call-7c1d"]); // the server's answer
  await eventually(() => logLines(/request_id=per-call-7c1d/).length > 0, 10_000, "the server's log line");
});

test("every failure is an AvailabilityError with the caller's stack, coalesced heartbeats included", async () => {
  const deactivated = await stores.mitra("Deactivated", { active: false });
  const coalescing = new AvailabilityClient(serve.address, { heartbeatWindowMs: 20 });
  async function relayHeartbeat(mitraId: string): Promise<unknown> {
    return coalescing.heartbeat(mitraId).catch((e: unknown) => e);
  }
  async function readStatus(mitraId: string): Promise<unknown> {
    return client.getMitraStatus(mitraId).catch((e: unknown) => e);
  }
  try {
    const [refused, unknown] = await Promise.all([relayHeartbeat(deactivated), readStatus(UNKNOWN)]);
    assert.ok(refused instanceof AvailabilityError && unknown instanceof AvailabilityError);
    assert.equal(refused.code, status.PERMISSION_DENIED);
    assert.equal(coalescing.heartbeatStats.batches, 1);
    assert.match(refused.stack!, /at relayHeartbeat /);
    assert.match(unknown.stack!, /at readStatus /);
    assert.equal(unknown.details, `mitra ${UNKNOWN} not found`);
    assert.ok(unknown.cause instanceof Error, "the grpc-js error is kept as the cause");
  } finally {
    await coalescing.close();
  }

  const closed = new AvailabilityClient(serve.address, { heartbeatWindowMs: 5 });
  await closed.countAvailableMitras();
  await closed.close();
  const calls = [
    () => closed.countAvailableMitras(),
    () => closed.heartbeat(deactivated),
    () => closed.waitForReady(new Date(Date.now() + 1_000)),
  ];
  for (const call of calls) {
    await assert.rejects(call(), (error: unknown) => {
      assert.ok(error instanceof AvailabilityError);
      assert.equal(error.code, status.CANCELLED);
      assert.equal(error.details, "the client was closed");
      return true;
    });
  }
});

test("interceptors: a request id and the caller's trace context reach the server's log line", async () => {
  // What OpenTelemetry's context is: async-local. Each call carries its caller's, even one
  // that waited in the in-flight queue (maxInFlight: 1) and was sent from another's callback.
  const trace = new AsyncLocalStorage<string>();
  const records: CallRecord[] = [];
  let made = 0;
  const traced = new AvailabilityClient(serve.address, {
    maxInFlight: 1,
    interceptors: [
      requestId(() => `node-req-${++made}`),
      traceContext((carrier) => {
        const traceId = trace.getStore();
        if (traceId) carrier.traceparent = `00-${traceId}-00f067aa0ba902b7-01`;
      }),
      observe((call) => records.push(call)),
    ],
  });
  const traceIds = ["4bf92f3577b34da6a3ce929d0e0e4736", "5cf92f3577b34da6a3ce929d0e0e4737"];
  try {
    await Promise.all(traceIds.map((id) => trace.run(id, () => traced.getMitraStatus(UNKNOWN).catch(() => undefined))));
    assert.deepEqual(
      records.map((r) => [r.method, status[r.code], r.requestId, r.error?.code]),
      [
        ["/availability.v1.AvailabilityService/GetMitraStatus", "NOT_FOUND", "node-req-1", status.NOT_FOUND],
        ["/availability.v1.AvailabilityService/GetMitraStatus", "NOT_FOUND", "node-req-2", status.NOT_FOUND],
      ],
    );
    for (const [i, traceId] of traceIds.entries()) {
      const pattern = new RegExp(`GetMitraStatus NOT_FOUND in .* request_id=node-req-${i + 1} `);
      await eventually(() => logLines(pattern).length > 0, 10_000, `the log line of node-req-${i + 1}`);
      const [line] = logLines(pattern);
      assert.match(line!, new RegExp(`trace_id=${traceId} span_id=00f067aa0ba902b7`));
    }
  } finally {
    await traced.close();
  }
});
