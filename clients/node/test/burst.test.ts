/** 10,000 concurrent unary heartbeats (coalescing off) all answered: the client keeps at
 * most maxInFlight on the wire. Sent all at once they overflowed the server's gRPC core,
 * which cancelled or timed them out before they reached the service (issue 30). */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { AvailabilityClient } from "@halo/availability-client";
import { Serve, Stores } from "./harness";

let stores: Stores;
let serve: Serve;
let mitras: string[];

before(async () => {
  stores = await Stores.start();
  stores.migrate();
  mitras = await stores.onlineFleet(10_000);
  serve = new Serve(stores, { HEARTBEAT_STALE_SECONDS: "3600" });
  await serve.start();
});

after(async () => {
  await serve?.stop();
  await stores?.close();
});

test("10,000 concurrent uncoalesced heartbeats all succeed, under the in-flight limit", async () => {
  const client = new AvailabilityClient(serve.address, { heartbeatWindowMs: 0 });
  const handledBefore = await serve.handled("Heartbeat");
  try {
    const started = performance.now();
    const calls = mitras.map((m) => client.heartbeat(m));
    const queued = client.queued;
    const settled = await Promise.allSettled(calls);
    const seconds = (performance.now() - started) / 1000;
    console.log(`# 10,000 uncoalesced heartbeats in ${seconds.toFixed(1)} s (${Math.round(10_000 / seconds)}/s)`);
    const failed = settled.filter((s) => s.status === "rejected").map((s) => String((s as PromiseRejectedResult).reason));
    assert.deepEqual(failed.slice(0, 3), [], `${failed.length} failed`);
    assert.ok(settled.every((s) => s.status === "fulfilled" && s.value === true));
    assert.equal(queued, 10_000 - 256, "all but the default 256 waited in the client");
    assert.equal(client.heartbeatStats.unary, 10_000);
    assert.equal((await serve.handled("Heartbeat")) - handledBefore, 10_000);
  } finally {
    await client.close();
  }
});
