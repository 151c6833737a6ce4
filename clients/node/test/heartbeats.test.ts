/** heartbeat() coalesces concurrent calls into one BatchHeartbeat, and each caller gets what
 * a unary Heartbeat would have given it. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { AvailabilityClient, AvailabilityError, status } from "@halo/availability-client";
import { Serve, Stores } from "./harness";

let stores: Stores;
let serve: Serve;

before(async () => {
  stores = await Stores.start();
  serve = new Serve(stores);
  await serve.start();
});

after(async () => {
  await serve?.stop();
  await stores?.close();
});

async function outcomes(calls: Array<Promise<boolean>>): Promise<Array<boolean | number>> {
  const settled = await Promise.allSettled(calls);
  return settled.map((s) => (s.status === "fulfilled" ? s.value : (s.reason as AvailabilityError).code));
}

test("coalesced heartbeats with a deactivated mitra among them: only its caller is refused", async () => {
  const client = new AvailabilityClient(serve.address, { heartbeatWindowMs: 20 });
  try {
    const online = await stores.mitras(5, "Online");
    for (const mitra of online) await client.setOnline(mitra);
    const deactivated = await stores.mitra("Deactivated");
    await client.setOnline(deactivated);
    await client.setMitraActive(deactivated, false);
    const batchesBefore = await serve.handled("BatchHeartbeat");
    const unaryBefore = await serve.handled("Heartbeat");

    const calls = [...online.slice(0, 3), deactivated, ...online.slice(3)].map((m) => client.heartbeat(m));
    const refused = calls[3].catch((error: AvailabilityError) => error);

    assert.deepEqual(await outcomes(calls), [true, true, true, status.PERMISSION_DENIED, true, true]);
    const error = (await refused) as AvailabilityError;
    assert.equal(error.details, `mitra ${deactivated} is deactivated`);
    assert.ok(error instanceof AvailabilityError && error.metadata !== undefined);
    assert.deepEqual(client.heartbeatStats, { heartbeats: 6, batches: 1, unary: 0 });
    assert.equal((await serve.handled("BatchHeartbeat")) - batchesBefore, 1);
    assert.equal((await serve.handled("Heartbeat")) - unaryBefore, 0);
    for (const mitra of online) assert.ok((await client.getMitraStatus(mitra)).fresh);
  } finally {
    await client.close();
  }
});

test("each caller gets what a unary Heartbeat answers it", async () => {
  const online = await stores.mitra("Online");
  const offline = await stores.mitra("Offline");
  const deactivated = await stores.mitra("Deactivated", { active: false });
  const unknown = "00000000-0000-0000-0000-00000000beef";
  const ids = [online, offline, deactivated, unknown, "nope"];
  const coalesced = new AvailabilityClient(serve.address, { heartbeatWindowMs: 20 });
  const unary = new AvailabilityClient(serve.address, { heartbeatWindowMs: 0 });
  try {
    await coalesced.setOnline(online);
    const together = await outcomes(ids.map((m) => coalesced.heartbeat(m)));
    const oneByOne = await outcomes(ids.map((m) => unary.heartbeat(m)));

    assert.deepEqual(together, [true, false, status.PERMISSION_DENIED, status.NOT_FOUND, status.INVALID_ARGUMENT]);
    assert.deepEqual(oneByOne, together);
    const bad = ["nope", "", "it's", 'say "hi"', "tab\there", "x".repeat(100), deactivated, unknown];
    const details = async (client: AvailabilityClient) =>
      Promise.all(bad.map(async (id) => ((await client.heartbeat(id).catch((e: AvailabilityError) => e)) as AvailabilityError).details));
    assert.deepEqual(await details(coalesced), await details(unary));
    assert.equal(coalesced.heartbeatStats.batches, 2);
    assert.equal(unary.heartbeatStats.batches, 0);
    assert.equal(unary.heartbeatStats.unary, ids.length + bad.length);
  } finally {
    await Promise.all([coalesced.close(), unary.close()]);
  }
});

test("a batch goes out when it reaches the maximum, without waiting for the window", async () => {
  const mitras = await stores.mitras(7, "Mitra");
  const client = new AvailabilityClient(serve.address, { heartbeatWindowMs: 60_000, heartbeatBatch: 3 });
  try {
    for (const mitra of mitras) await client.setOnline(mitra);
    const first = Promise.all(mitras.slice(0, 6).map((m) => client.heartbeat(m)));
    assert.deepEqual(await first, [true, true, true, true, true, true]);
    const last = client.heartbeat(mitras[6]);
    assert.equal(client.heartbeatStats.batches, 2);
    await client.close(); // sends the one still in its window
    assert.equal(await last, true);
    assert.equal(client.heartbeatStats.batches, 3);
  } finally {
    await client.close();
  }
});

test("a whole batch that fails rejects every caller with its status", async () => {
  const client = new AvailabilityClient("127.0.0.1:1", { heartbeatWindowMs: 5, attempts: 1 });
  try {
    const calls = ["00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"].map((m) =>
      client.heartbeat(m),
    );
    assert.deepEqual(await outcomes(calls), [status.UNAVAILABLE, status.UNAVAILABLE]);
    assert.equal(client.heartbeatStats.batches, 1);
  } finally {
    await client.close();
  }
});
