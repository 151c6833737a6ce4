/** watchAvailable(): the live set equals what FindAvailableMitras says, picks the least
 * loaded, and resumes by revision across a server restart. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { AvailabilityClient, type AvailabilityEvent, type AvailableMitra, type LiveAvailability } from "@halo/availability-client";
import { eventually, Serve, Stores } from "./harness";

let stores: Stores;
let serve: Serve;
let client: AvailabilityClient;

before(async () => {
  stores = await Stores.start();
  serve = new Serve(stores);
  await serve.start();
  client = new AvailabilityClient(serve.address);
});

after(async () => {
  await client?.close();
  await serve?.stop();
  await stores?.close();
});

function byId(mitras: Iterable<AvailableMitra>): Record<string, AvailableMitra> {
  return Object.fromEntries([...mitras].map((m) => [m.mitraId, m]));
}

async function converged(live: LiveAvailability): Promise<boolean> {
  const found = await client.findAvailableMitras(10_000).catch(() => undefined);
  if (!found || !live.inSync) return false;
  try {
    assert.deepEqual(byId(live.mitras.values()), byId(found));
    return true;
  } catch {
    return false;
  }
}

test("the pairing service blasts from the live set, least loaded first", async () => {
  const [idle, busy, declined] = [await stores.mitra("Idle"), await stores.mitra("Busy"), await stores.mitra("Declined")];
  for (const mitra of [idle, busy, declined]) await client.setOnline(mitra);
  await stores.session(busy);
  await client.recomputeLoad([busy]);
  const live = client.watchAvailable();
  try {
    await live.waitInSync(20_000);
    await eventually(() => live.mitras.get(busy)?.load === 1, 20_000, "busy's load in the live set");
    const first = live.leastLoaded(20, [declined]).map((m) => m.mitraId);
    await client.setOffline(idle);
    await eventually(() => !live.mitras.has(idle), 20_000, "idle gone from the live set");
    const second = live.leastLoaded(20, [declined]).map((m) => m.mitraId);

    assert.deepEqual(first, [idle, busy]);
    assert.deepEqual(second, [busy]);
    assert.equal(live.reconnects, 0);
  } finally {
    live.close();
    await client.setOffline(busy);
    await client.setOffline(declined);
  }
});

test("ties in load go by id, as in Python's least_loaded", async () => {
  const ids = await stores.mitras(4, "Tie");
  for (const mitra of ids) await client.setOnline(mitra);
  const live = client.watchAvailable();
  try {
    await eventually(() => converged(live), 20_000, "live set equal to FindAvailableMitras");
    const picks = live.leastLoaded(10).filter((m) => ids.includes(m.mitraId));
    assert.deepEqual(picks.map((m) => m.mitraId), [...ids].sort());
    assert.equal(live.leastLoaded(2).length, 2);
  } finally {
    live.close();
    for (const mitra of ids) await client.setOffline(mitra);
  }
});

test("the live set equals FindAvailableMitras after every change of a sequence", async () => {
  const mitras = await stores.mitras(4, "Seq", { capacity: 2 });
  const events: AvailabilityEvent[] = [];
  const live = client.watchAvailable();
  const seen = (async () => {
    for await (const event of live) events.push(event);
  })();
  const steps: Array<() => Promise<unknown>> = [
    () => client.setOnline(mitras[0]),
    () => client.setOnline(mitras[1]),
    () => client.heartbeat(mitras[1]),
    async () => (await stores.session(mitras[0]), client.recomputeLoad([mitras[0]])),
    async () => (await stores.session(mitras[0]), client.recomputeLoad([mitras[0]])), // full
    () => client.setMitraActive(mitras[1], false),
    () => client.setOnline(mitras[2]),
    () => stores.sql("UPDATE mitras SET max_concurrent_sessions = 3 WHERE id = $1", [mitras[0]]), // trigger only
    () => client.setOffline(mitras[2]),
    () => client.setMitraActive(mitras[1], true),
  ];
  try {
    await eventually(() => converged(live), 20_000, "first snapshot");
    for (const step of steps) {
      await step();
      await eventually(() => converged(live), 20_000, "live set equal to FindAvailableMitras");
    }
    assert.equal(live.reconnects, 0);
    assert.equal(events[0].type, "snapshot");
    const kinds = new Set(events.slice(1).map((e) => (e.type === "change" ? e.kind : "snapshot")));
    assert.deepEqual([...kinds].sort(), ["available", "load_changed", "unavailable"]);
    const reasons = events.flatMap((e) => (e.type === "change" && e.reason ? [e.reason] : []));
    for (const reason of ["full", "deactivated", "offline"]) assert.ok(reasons.includes(reason as never), reason);
  } finally {
    live.close();
    await seen;
    for (const mitra of mitras) await client.setOffline(mitra);
  }
});

test("a watch resumes across a server restart and converges, in sync again", async () => {
  const [ayu, budi, citra] = [await stores.mitra("Ayu"), await stores.mitra("Budi"), await stores.mitra("Citra")];
  await client.setOnline(ayu);
  await client.setOnline(budi);
  const live = client.watchAvailable();
  const syncs: boolean[] = [];
  const events: AvailabilityEvent[] = [];
  live.on("sync", (inSync) => syncs.push(inSync));
  live.on("snapshot", (snapshot) => events.push(snapshot));
  live.on("change", (change) => events.push(change));
  try {
    await eventually(() => converged(live), 20_000, "live set before the restart");
    const before = live.revision;
    events.length = 0;

    await serve.stop();
    await eventually(() => !live.inSync, 20_000, "out of sync once the server is gone");
    // What happens meanwhile lands in Postgres, as the other backends write it.
    await stores.session(budi);
    await serve.start();
    // The channel reconnects on gRPC's own backoff (1 s, then 1.6 times longer each try).
    await eventually(() => client.setOnline(citra).then(() => true, () => false), 30_000, "setOnline after the restart");

    await eventually(() => converged(live), 30_000, "live set equal to FindAvailableMitras after the restart");
    assert.ok(live.inSync);
    assert.ok(live.reconnects >= 1);
    assert.ok(live.revision > before);
    assert.ok(live.mitras.has(citra));
    assert.equal(live.mitras.get(budi)?.load, 1);
    assert.deepEqual(syncs.slice(0, 2), [true, false]);
    assert.equal(syncs.at(-1), true);
    // Valkey kept the changes: resumed by revision, no second snapshot.
    assert.ok(events.length > 0 && events.every((e) => e.type === "change"), JSON.stringify(events));
  } finally {
    live.close();
    for (const mitra of [ayu, budi, citra]) await client.setOffline(mitra);
  }
});

test("a watch whose missed changes are gone gets a fresh snapshot", async () => {
  const [ayu, budi] = [await stores.mitra("Ayu"), await stores.mitra("Budi")];
  await client.setOnline(ayu);
  const live = client.watchAvailable();
  const snapshots: number[] = [];
  live.on("snapshot", (snapshot) => snapshots.push(snapshot.revision));
  try {
    await eventually(() => converged(live), 20_000, "live set before the flush");
    const before = live.revision;

    // A Valkey that lost its data, changes included: the server reseeds it and sends its
    // watchers a fresh snapshot.
    await stores.valkeyCommand("FLUSHALL");
    await eventually(() => snapshots.length === 2, 20_000, "a second snapshot");
    await client.setOnline(budi);

    await eventually(async () => (await converged(live)) && live.mitras.has(budi), 30_000, "live set after the reseed");
    assert.equal(snapshots.length, 2);
    assert.ok(snapshots[1] > before);
  } finally {
    live.close();
    for (const mitra of [ayu, budi]) await client.setOffline(mitra);
  }
});

test("closing the client ends its live sets", async () => {
  const other = new AvailabilityClient(serve.address);
  const live = other.watchAvailable();
  await live.waitInSync(20_000);
  await other.close();
  await new Promise((done) => setTimeout(done, 300));
  assert.equal(live.inSync, false);
  assert.equal(live.reconnects, 0);
});
