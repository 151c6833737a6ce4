/** The README's chat backend (examples/chat-backend.ts) against a real server. */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import type { FastifyInstance } from "fastify";

import { AvailabilityClient } from "@halo/availability-client";
import { buildApp } from "../examples/chat-backend";
import { Serve, Stores } from "./harness";

let stores: Stores;
let serve: Serve;
let availability: AvailabilityClient;
let app: FastifyInstance;

before(async () => {
  stores = await Stores.start();
  serve = new Serve(stores);
  await serve.start();
  availability = new AvailabilityClient(serve.address);
  app = buildApp(availability);
});

after(async () => {
  await app?.close();
  await availability?.close();
  await serve?.stop();
  await stores?.close();
});

async function call(method: "GET" | "POST", url: string, payload?: object): Promise<[number, any]> {
  const reply = await app.inject(payload === undefined ? { method, url } : { method, url, payload });
  return [reply.statusCode, reply.json()];
}

test("the chat backend's routes relay to the service, with its errors as HTTP statuses", async () => {
  const [ayu, budi] = await stores.mitras(2, "Mitra");
  await stores.authSession(budi);

  assert.deepEqual(await call("POST", `/mitras/${ayu}/heartbeat`), [200, { online: false }]);
  assert.deepEqual(await call("POST", `/mitras/${ayu}/online`), [200, { online: true, available: true }]);
  assert.deepEqual(await call("POST", `/mitras/${ayu}/heartbeat`), [200, { online: true }]);
  await stores.session(ayu);
  assert.deepEqual(await call("POST", "/internal/chat-sessions/moved", { mitraIds: [ayu] }), [200, { [ayu]: 1 }]);
  const [beaconStatus, beacon] = await call("GET", "/beacon");
  assert.equal(beaconStatus, 200);
  assert.equal(beacon.available, 1);
  const [, dashboard] = await call("GET", "/dashboard");
  assert.equal(dashboard.activeChats, 1);
  assert.deepEqual(dashboard.customersPerMitra, [{ mitraId: ayu, displayName: "Mitra 0", activeSessionCount: 1 }]);
  assert.deepEqual(await call("POST", `/mitras/${ayu}/offline`), [200, { online: false }]);

  assert.deepEqual(await call("POST", `/admin/mitras/${budi}/active`, { active: false }), [
    200,
    { active: false, revokedAuthSessions: 1 },
  ]);
  const [refused, why] = await call("POST", `/mitras/${budi}/heartbeat`);
  assert.deepEqual([refused, why.error], [403, "PERMISSION_DENIED"]);
  assert.equal((await call("POST", `/mitras/${budi}/online`))[0], 409);
  assert.equal((await call("POST", "/mitras/00000000-0000-0000-0000-000000000001/online"))[0], 404);
  assert.equal((await call("POST", "/mitras/nope/heartbeat"))[0], 400);
});
