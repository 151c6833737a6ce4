/** Deadlines and retries come from the channel's service config. A real server cannot be
 * made to fail exactly N times and then answer, or to hang, so these few tests use a tiny
 * grpc-js server that does (as tests/test_client.py does with its Flaky servicer). */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Server, ServerCredentials, type ServerUnaryCall, type sendUnaryData, status } from "@grpc/grpc-js";

import { AvailabilityClient, serviceConfig } from "@halo/availability-client";
import {
  AvailabilityServiceService,
  type HeartbeatRequest,
  type HeartbeatResponse,
  type IsMitraReachableRequest,
  type IsMitraReachableResponse,
  Source,
} from "../src/gen/availability/v1/availability";

type Handler = (call: ServerUnaryCall<IsMitraReachableRequest, IsMitraReachableResponse>, reply: sendUnaryData<IsMitraReachableResponse>) => void;

let server: Server;
let port = 0;
let handler: Handler = () => {};
let calls = 0;
let unaryHeartbeats = 0;

before(async () => {
  server = new Server();
  server.addService(AvailabilityServiceService, {
    isMitraReachable: ((call, reply) => {
      calls += 1;
      handler(call, reply);
    }) as Handler,
    // A server from before BatchHeartbeat: grpc-js answers that one UNIMPLEMENTED.
    heartbeat: (call: ServerUnaryCall<HeartbeatRequest, HeartbeatResponse>, reply: sendUnaryData<HeartbeatResponse>) => {
      unaryHeartbeats += 1;
      reply(null, { online: call.request.mitraId === MITRA });
    },
  });
  port = await new Promise<number>((done, fail) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (error, bound) => (error ? fail(error) : done(bound))),
  );
});

after(() => server.forceShutdown());

function failing(times: number, code: status): Handler {
  let failed = 0;
  return (_call, reply) => {
    if (failed++ < times) reply({ code, details: "not now" });
    else reply(null, { reachable: true, source: Source.SOURCE_CACHE });
  };
}

async function withClient<T>(options: ConstructorParameters<typeof AvailabilityClient>[1], use: (c: AvailabilityClient) => Promise<T>): Promise<T> {
  const client = new AvailabilityClient(`127.0.0.1:${port}`, options);
  try {
    return await use(client);
  } finally {
    await client.close();
  }
}

const MITRA = "00000000-0000-0000-0000-000000000001";

test("the service config retries unary calls, the streams not, and leaves deadlines to each call", () => {
  const config = JSON.parse(serviceConfig(4));
  const [unary, streams] = config.methodConfig;
  assert.deepEqual(config.loadBalancingConfig, [{ round_robin: {} }]);
  assert.deepEqual(unary.name, [
    { service: "availability.v1.AvailabilityService" },
    { service: "availability.v1.DashboardService" },
  ]);
  assert.equal(unary.timeout, undefined); // grpc-js would cap every call's own deadline with it
  assert.deepEqual(unary.retryPolicy.retryableStatusCodes, ["UNAVAILABLE"]);
  assert.equal(unary.retryPolicy.maxAttempts, 4);
  assert.deepEqual(streams, {
    name: [
      { service: "availability.v1.AvailabilityService", method: "WatchAvailableMitras" },
      { service: "availability.v1.DashboardService", method: "WatchDashboardStats" },
    ],
  });
  assert.equal(JSON.parse(serviceConfig(1)).methodConfig[0].retryPolicy, undefined);
});

test("a call's own timeoutMs replaces the client's, longer or shorter", async () => {
  [handler, calls] = [(_call, reply) => setTimeout(() => reply(null, { reachable: true, source: Source.SOURCE_CACHE }), 500), 0];
  await withClient({ timeoutMs: 100 }, async (client) => {
    await assert.rejects(client.isMitraReachable(MITRA), { code: status.DEADLINE_EXCEEDED });
    assert.equal(await client.isMitraReachable(MITRA, { timeoutMs: 30_000 }), true);
  });
  await withClient({ timeoutMs: 30_000 }, async (client) => {
    await assert.rejects(client.isMitraReachable(MITRA, { timeoutMs: 100 }), { code: status.DEADLINE_EXCEEDED });
  });
});

test("UNAVAILABLE is retried by the channel", async () => {
  [handler, calls] = [failing(2, status.UNAVAILABLE), 0];
  assert.equal(await withClient({}, (c) => c.isMitraReachable(MITRA)), true);
  assert.equal(calls, 3);
});

test("other errors are not retried", async () => {
  [handler, calls] = [failing(1, status.NOT_FOUND), 0];
  await assert.rejects(withClient({}, (c) => c.isMitraReachable(MITRA)), { code: status.NOT_FOUND });
  assert.equal(calls, 1);
});

test("retries stop after the configured attempts", async () => {
  [handler, calls] = [failing(10, status.UNAVAILABLE), 0];
  await assert.rejects(withClient({ attempts: 3 }, (c) => c.isMitraReachable(MITRA)), { code: status.UNAVAILABLE });
  assert.equal(calls, 3);
});

test("a call that gets no answer ends at the configured deadline", async () => {
  [handler, calls] = [() => {}, 0];
  const started = Date.now();
  await assert.rejects(withClient({ timeoutMs: 300 }, (c) => c.isMitraReachable(MITRA)), { code: status.DEADLINE_EXCEEDED });
  const took = Date.now() - started;
  assert.ok(took >= 280 && took < 5_000, `took ${took} ms`);
});

test("at most maxInFlight unary calls are on the wire; the rest wait, and an abort takes one out of the queue", async () => {
  let active = 0;
  let most = 0;
  calls = 0;
  handler = (_call, reply) => {
    active += 1;
    most = Math.max(most, active);
    setTimeout(() => {
      active -= 1;
      reply(null, { reachable: true, source: Source.SOURCE_CACHE });
    }, 20);
  };
  await withClient({ maxInFlight: 3 }, async (client) => {
    const waiting = new AbortController();
    const all = Array.from({ length: 10 }, (_, i) => client.isMitraReachable(MITRA, i === 9 ? { signal: waiting.signal } : {}));
    assert.equal(client.queued, 7);
    waiting.abort();
    const settled = await Promise.allSettled(all);
    assert.deepEqual(settled.slice(0, 9).map((s) => s.status === "fulfilled" && s.value), Array(9).fill(true));
    assert.equal(((settled[9] as PromiseRejectedResult).reason as { code: number }).code, status.CANCELLED);
  });
  assert.equal(most, 3);
  assert.equal(calls, 9, "the aborted call never reached the server");
});

test("options out of range are refused", () => {
  assert.throws(() => new AvailabilityClient("127.0.0.1:1", { heartbeatBatch: 5_001 }), RangeError);
  assert.throws(() => new AvailabilityClient("127.0.0.1:1", { timeoutMs: 0 }), RangeError);
  assert.throws(() => new AvailabilityClient("127.0.0.1:1", { maxInFlight: 0 }), RangeError);
});

test("a server without BatchHeartbeat gets unary heartbeats, from then on", async () => {
  const other = "00000000-0000-0000-0000-000000000002";
  unaryHeartbeats = 0;
  await withClient({ heartbeatWindowMs: 5 }, async (client) => {
    assert.deepEqual(await Promise.all([client.heartbeat(MITRA), client.heartbeat(other)]), [true, false]);
    assert.equal(await client.heartbeat(MITRA), true);
    assert.deepEqual(client.heartbeatStats, { heartbeats: 3, batches: 1, unary: 3 });
  });
  assert.equal(unaryHeartbeats, 3);
});
