/** A snapshot larger than one message (5,000 mitras a part) is applied whole, once. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { AvailabilityClient, type AvailabilitySnapshot } from "@halo/availability-client";
import { Serve, Stores } from "./harness";

const FLEET = 5_001;
let stores: Stores;
let serve: Serve;
let fleet: string[];

before(async () => {
  stores = await Stores.start();
  stores.migrate();
  fleet = await stores.onlineFleet(FLEET);
  serve = new Serve(stores, { HEARTBEAT_STALE_SECONDS: "3600" });
  await serve.start();
});

after(async () => {
  await serve?.stop();
  await stores?.close();
});

test("a snapshot in parts replaces the set once its last part arrives", async () => {
  const client = new AvailabilityClient(serve.address);
  const snapshots: AvailabilitySnapshot[] = [];
  try {
    const live = client.watchAvailable();
    live.on("snapshot", (snapshot) => snapshots.push(snapshot));
    await live.waitInSync(20_000);

    assert.equal(snapshots.length, 1);
    assert.equal(snapshots[0].mitras.length, FLEET);
    assert.deepEqual([...live.mitras.keys()].sort(), fleet);
    const found = await client.findAvailableMitras(10_000);
    assert.equal(found.length, FLEET);
    assert.deepEqual(
      live.leastLoaded(3).map((m) => m.mitraId),
      [...fleet].sort().slice(0, 3),
    );
  } finally {
    await client.close();
  }
});
