/** A restarted server is used again within 2 s of serving: the channel's reconnect backoff
 * is about 1 s (grpc-js's default grows to minutes, and kept calls failing for 4.5-10 s). */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { AvailabilityClient, AvailabilityError, status } from "@halo/availability-client";
import { eventually, Serve, Stores } from "./harness";

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

test("waitForReady resolves once connected, rejects at its deadline otherwise", async () => {
  const nowhere = new AvailabilityClient("127.0.0.1:1");
  const client = new AvailabilityClient(serve.address);
  try {
    await assert.rejects(nowhere.waitForReady(new Date(Date.now() + 300)), (error: unknown) => {
      assert.ok(error instanceof AvailabilityError);
      assert.equal(error.code, status.DEADLINE_EXCEEDED);
      return true;
    });
    await client.waitForReady(new Date(Date.now() + 10_000));
    assert.equal(await client.health(), "SERVING");
  } finally {
    await Promise.all([nowhere.close(), client.close()]);
  }
});

test("calls succeed within 2 s of a restarted server serving again", async () => {
  const client = new AvailabilityClient(serve.address, { attempts: 1 });
  try {
    await client.countAvailableMitras();
    await serve.stop();
    await assert.rejects(client.countAvailableMitras(), { code: status.UNAVAILABLE });
    // An outage long enough for grpc-js's default backoff (1 s, x1.6 each try) to grow to
    // about 6 s: with it, a restart usually went unnoticed for seconds.
    await sleep(10_000);
    const restarting = performance.now();
    await serve.start(); // returns as soon as a new client's health check says SERVING
    const serving = performance.now();
    console.log(`# reconnect: the server took ${(serving - restarting).toFixed(0)} ms to start`);
    await eventually(
      () => client.countAvailableMitras().then(() => true, () => false),
      30_000,
      "a call through the old channel",
    );
    const tookMs = performance.now() - serving;
    console.log(`# reconnect: calls succeeded ${tookMs.toFixed(0)} ms after the restarted server was serving`);
    assert.ok(tookMs < 2_000, `calls succeeded only ${tookMs.toFixed(0)} ms after the server was serving`);
  } finally {
    await client.close();
  }
});
