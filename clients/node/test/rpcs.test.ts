/** Every RPC of both services callable and typed, against a real server; errors keep their
 * codes; the bearer token and mutual TLS. */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { AvailabilityClient, type AvailabilityCount, type DashboardStats, type MitraStatus, status } from "@halo/availability-client";
import { Serve, Stores, VENV_BIN } from "./harness";

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

test("every RPC returns the service's own types", async () => {
  const ayu = await stores.mitra("Ayu", { capacity: 2 });
  const budi = await stores.mitra("Budi");
  await stores.authSession(budi);

  const online: MitraStatus = await client.setOnline(ayu);
  const beat: boolean = await client.heartbeat(ayu);
  const [batched] = await client.batchHeartbeat([ayu]);
  await stores.session(ayu);
  const loads: Map<string, number> = await client.recomputeLoad([ayu]);
  const current: MitraStatus = await client.getMitraStatus(ayu);
  const reachable: boolean = await client.isMitraReachable(ayu);
  const found = await client.findAvailableMitras(10);
  const count: AvailabilityCount = await client.countAvailableMitras();
  const { status: deactivated, revokedAuthSessions } = await client.setMitraActive(budi, false);
  const offline = await client.setOffline(ayu);
  const dashboard: DashboardStats = await client.getDashboardStats();
  let watched: DashboardStats | undefined;
  for await (const update of client.watchDashboardStats({ intervalMs: 1_000 })) {
    watched = update;
    break;
  }
  const health = await client.health("availability.v1.AvailabilityService");

  assert.ok(online.online && online.available && online.mitraId === ayu);
  assert.equal(beat, true);
  assert.deepEqual({ mitraId: batched.mitraId, online: batched.online }, { mitraId: ayu, online: true });
  assert.deepEqual([...loads], [[ayu, 1]]);
  assert.equal(current.load, 1);
  assert.equal(current.source, "cache");
  assert.ok(current.lastHeartbeatAt instanceof Date);
  assert.equal(reachable, true);
  assert.deepEqual(found, [{ mitraId: ayu, displayName: "Ayu", load: 1, maxConcurrentSessions: 2 }]);
  assert.deepEqual([count.available, count.online], [1, 1]);
  assert.ok(count.asOf instanceof Date);
  assert.ok(!deactivated.active);
  assert.equal(revokedAuthSessions, 1);
  assert.ok(!offline.online);
  assert.equal(dashboard.activeChats, 1);
  assert.equal(dashboard.onlineMitras, 0);
  assert.equal(dashboard.source, "cache");
  assert.deepEqual(watched?.activeChats, dashboard.activeChats);
  assert.equal(health, "SERVING");
});

test("errors keep their codes", async () => {
  await assert.rejects(client.getMitraStatus("not-a-uuid"), (error: { code: number; details: string }) => {
    assert.equal(error.code, status.INVALID_ARGUMENT);
    assert.match(error.details, /mitra_id/);
    return true;
  });
  await assert.rejects(client.setOnline("00000000-0000-0000-0000-000000000001"), { code: status.NOT_FOUND });
  const gone = await stores.mitra("Gone", { active: false });
  await assert.rejects(client.setOnline(gone), { code: status.FAILED_PRECONDITION });
});

test("a bearer token is sent with every call", async () => {
  const guarded = new Serve(stores, { AUTH_TOKENS: "old-token,new-token" });
  await guarded.start();
  const anonymous = new AvailabilityClient(guarded.address);
  const wrong = new AvailabilityClient(guarded.address, { token: "nope" });
  const right = new AvailabilityClient(guarded.address, { token: "new-token" });
  try {
    await assert.rejects(anonymous.countAvailableMitras(), { code: status.UNAUTHENTICATED });
    await assert.rejects(wrong.countAvailableMitras(), { code: status.UNAUTHENTICATED });
    const refused = wrong.watchAvailable();
    await assert.rejects(refused.waitInSync(20_000), { code: status.UNAUTHENTICATED });
    assert.equal(refused.failure?.code, status.UNAUTHENTICATED); // for good: no reconnects
    assert.equal(refused.reconnects, 0);
    assert.equal(typeof (await right.countAvailableMitras()).available, "number");
    const live = right.watchAvailable();
    await live.waitInSync(20_000);
    live.close();
  } finally {
    await Promise.all([anonymous.close(), wrong.close(), right.close()]);
    await guarded.stop();
  }
});

test("mutual TLS with the client's certificate", async () => {
  // Certificates from trustme, as tests/test_security.py makes them.
  const dir = stores.dir;
  execFileSync(join(VENV_BIN, "python"), [
    "-c",
    "import sys, trustme\n" +
      "d = sys.argv[1]; ca = trustme.CA(); server = ca.issue_cert('127.0.0.1', 'localhost')\n" +
      "client = ca.issue_cert('chat-backend')\n" +
      "ca.cert_pem.write_to_path(d + '/ca.pem')\n" +
      "server.private_key_pem.write_to_path(d + '/server.key')\n" +
      "open(d + '/server.pem', 'wb').write(b''.join(b.bytes() for b in server.cert_chain_pems))\n" +
      "client.private_key_pem.write_to_path(d + '/client.key')\n" +
      "open(d + '/client.pem', 'wb').write(b''.join(b.bytes() for b in client.cert_chain_pems))\n",
    dir,
  ]);
  const file = (name: string) => readFileSync(join(dir, name));
  const tlsServe = new Serve(stores, {
    TLS_CERT_FILE: join(dir, "server.pem"),
    TLS_KEY_FILE: join(dir, "server.key"),
    TLS_CLIENT_CA_FILE: join(dir, "ca.pem"),
  });
  const tls = { ca: file("ca.pem"), cert: file("client.pem"), key: file("client.key") };
  // The certificate names 127.0.0.1 and localhost; TLS wants a host name to ask for.
  const channelOptions = { "grpc.ssl_target_name_override": "localhost" };
  await tlsServe.start({ tls, channelOptions });
  const withCert = new AvailabilityClient(tlsServe.address, { tls, channelOptions });
  const withoutCert = new AvailabilityClient(tlsServe.address, { tls: { ca: file("ca.pem") }, channelOptions, attempts: 1 });
  const plaintext = new AvailabilityClient(tlsServe.address, { attempts: 1 });
  try {
    assert.equal(typeof (await withCert.countAvailableMitras()).available, "number");
    await assert.rejects(withoutCert.countAvailableMitras(), { code: status.UNAVAILABLE });
    await assert.rejects(plaintext.countAvailableMitras(), { code: status.UNAVAILABLE });
  } finally {
    await Promise.all([withCert.close(), withoutCert.close(), plaintext.close()]);
    await tlsServe.stop();
  }
});
