/** Presence bound to mitras: the mitra's auth session goes as x-mitra-session on
 * SetOnline, SetOffline and unary Heartbeat, and as mitra_sessions in a BatchHeartbeat; an
 * id the server refuses (OUTCOME_SESSION_REFUSED) fails its caller with PERMISSION_DENIED.
 * Here a tiny grpc-js server that only records what arrives on the wire checks exactly what
 * is sent (tests/test_client.py's Flaky servicer does the same); bound.test.ts runs the same
 * paths against a real server. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Metadata, Server, ServerCredentials, type ServerUnaryCall, type sendUnaryData } from "@grpc/grpc-js";

import { AvailabilityClient, AvailabilityError, MITRA_SESSION_HEADER, status } from "@halo/availability-client";
import {
  AvailabilityServiceService,
  type BatchHeartbeatRequest,
  type BatchHeartbeatResponse,
  HeartbeatResult_Outcome as Outcome,
  type MitraStatus,
  Source,
} from "../src/gen/availability/v1/availability";

const REFUSED = "refused-session";
let server: Server;
let address = "";
/** [method, mitra id, x-mitra-session values] of each unary presence call. */
const presence: Array<[string, string, string[]]> = [];
const batches: BatchHeartbeatRequest[] = [];

function mitraStatus(mitraId: string, online: boolean): MitraStatus {
  return {
    mitraId, displayName: "", online, active: true, fresh: online, reachable: online, available: online,
    load: 0, maxConcurrentSessions: 3, lastHeartbeatTime: undefined, source: Source.SOURCE_DATABASE,
  };
}

function sessions(metadata: Metadata): string[] {
  return metadata.get(MITRA_SESSION_HEADER).map(String);
}

before(async () => {
  server = new Server();
  const record = (method: string, call: ServerUnaryCall<{ mitraId: string }, unknown>) =>
    presence.push([method, call.request.mitraId, sessions(call.metadata)]);
  server.addService(AvailabilityServiceService, {
    setOnline: (call: ServerUnaryCall<{ mitraId: string }, unknown>, reply: sendUnaryData<{ status: MitraStatus }>) => {
      record("SetOnline", call);
      reply(null, { status: mitraStatus(call.request.mitraId, true) });
    },
    setOffline: (call: ServerUnaryCall<{ mitraId: string }, unknown>, reply: sendUnaryData<{ status: MitraStatus }>) => {
      record("SetOffline", call);
      reply(null, { status: mitraStatus(call.request.mitraId, false) });
    },
    heartbeat: (call: ServerUnaryCall<{ mitraId: string }, unknown>, reply: sendUnaryData<{ online: boolean }>) => {
      record("Heartbeat", call);
      if (sessions(call.metadata).includes(REFUSED)) {
        reply({ code: status.PERMISSION_DENIED, details: `mitra ${call.request.mitraId}: session refused` });
      } else {
        reply(null, { online: true });
      }
    },
    batchHeartbeat: (call: ServerUnaryCall<BatchHeartbeatRequest, unknown>, reply: sendUnaryData<BatchHeartbeatResponse>) => {
      batches.push(call.request);
      const results = call.request.mitraIds.map((mitraId, i) =>
        call.request.mitraSessions[i] === REFUSED
          ? { mitraId, online: false, outcome: Outcome.OUTCOME_SESSION_REFUSED }
          : { mitraId, online: true, outcome: Outcome.OUTCOME_RECORDED },
      );
      reply(null, { results });
    },
  });
  const port = await new Promise<number>((done, fail) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (error, bound) => (error ? fail(error) : done(bound))),
  );
  address = `127.0.0.1:${port}`;
});

after(() => server.forceShutdown());

const [A, B, C] = ["00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b", "00000000-0000-0000-0000-00000000000c"];

test("setOnline, setOffline and unary heartbeat carry the session as x-mitra-session", async () => {
  presence.length = 0;
  const client = new AvailabilityClient(address, { heartbeatWindowMs: 0 });
  try {
    await client.setOnline(A, { mitraSession: "session-a" });
    assert.equal(await client.heartbeat(A, { mitraSession: "session-a" }), true);
    await client.setOffline(A, { mitraSession: "session-a" });
    await client.setOnline(B); // a caller not bound to mitras sends none
    await assert.rejects(client.heartbeat(C, { mitraSession: REFUSED }), (error: unknown) => {
      assert.ok(error instanceof AvailabilityError);
      assert.equal(error.code, status.PERMISSION_DENIED);
      return true;
    });
  } finally {
    await client.close();
  }
  assert.deepEqual(presence, [
    ["SetOnline", A, ["session-a"]],
    ["Heartbeat", A, ["session-a"]],
    ["SetOffline", A, ["session-a"]],
    ["SetOnline", B, []],
    ["Heartbeat", C, [REFUSED]],
  ]);
});

test("coalesced heartbeats carry mitra_sessions, one per id in order, and a refused id fails its caller only", async () => {
  batches.length = 0;
  const client = new AvailabilityClient(address, { heartbeatWindowMs: 20 });
  try {
    const calls = [
      client.heartbeat(A, { mitraSession: "session-a" }),
      client.heartbeat(B), // no session: "" in its place
      client.heartbeat(C, { mitraSession: REFUSED }),
    ];
    const [a, b, c] = await Promise.allSettled(calls);
    assert.deepEqual([a, b], [{ status: "fulfilled", value: true }, { status: "fulfilled", value: true }]);
    assert.equal(c?.status, "rejected");
    const refused = (c as PromiseRejectedResult).reason as unknown;
    assert.ok(refused instanceof AvailabilityError);
    assert.equal(refused.code, status.PERMISSION_DENIED);
    assert.match(refused.details, new RegExp(`mitra ${C}`));

    assert.equal(await client.heartbeat(A), true); // a batch without any session
  } finally {
    await client.close();
  }
  assert.deepEqual(
    batches.map((b) => [b.mitraIds, b.mitraSessions]),
    [
      [[A, B, C], ["session-a", "", REFUSED]],
      [[A], []],
    ],
  );
});

test("batchHeartbeat sends the sessions it is given", async () => {
  batches.length = 0;
  const client = new AvailabilityClient(address);
  try {
    const results = await client.batchHeartbeat([A, C], { mitraSessions: ["session-a", REFUSED] });
    assert.deepEqual(results.map((r) => r.outcome), [Outcome.OUTCOME_RECORDED, Outcome.OUTCOME_SESSION_REFUSED]);
  } finally {
    await client.close();
  }
  assert.deepEqual(batches.map((b) => b.mitraSessions), [["session-a", REFUSED]]);
});
