/** Presence bound to mitras, end to end against a real `availability serve`: a caller whose
 * entry says bind_presence moves only the mitras whose auth session its calls carry, through
 * every path the client has (unary calls, coalesced heartbeats, an explicit batch). */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { AvailabilityClient, AvailabilityError, status } from "@halo/availability-client";
import { HeartbeatResult_Outcome as Outcome } from "../src/gen/availability/v1/availability";
import { Serve, Stores } from "./harness";

const TOKEN = "chat-backend-token-for-the-bound-test";
let stores: Stores;
let serve: Serve;
let client: AvailabilityClient;

before(async () => {
  stores = await Stores.start();
  const callers = join(stores.dir, "callers.toml");
  const digest = createHash("sha256").update(TOKEN).digest("hex");
  writeFileSync(
    callers,
    `[callers.chat-backend]\ntoken_sha256 = ["${digest}"]\nscopes = ["presence", "read"]\nbind_presence = "auth_session"\n`,
    { mode: 0o600 },
  );
  serve = new Serve(stores, { AUTH_CALLERS_FILE: callers });
  await serve.start({ token: TOKEN });
  client = new AvailabilityClient(serve.address, { token: TOKEN, heartbeatWindowMs: 20 });
});

after(async () => {
  await client?.close();
  await serve?.stop();
  await stores?.close();
});

function deniedFor(mitraId: string, session: string) {
  return (error: unknown): boolean => {
    assert.ok(error instanceof AvailabilityError);
    assert.equal(error.code, status.PERMISSION_DENIED);
    assert.match(error.details, new RegExp(`mitra ${mitraId}`));
    assert.ok(!error.details.includes(session), "the session is never repeated");
    return true;
  };
}

test("a bound caller moves only the mitra whose session it carries", async () => {
  const ayu = await stores.mitra("Ayu");
  const budi = await stores.mitra("Budi");
  const ayus = await stores.authSession(ayu);

  assert.equal((await client.setOnline(ayu, { mitraSession: ayus })).online, true);
  await assert.rejects(client.setOnline(budi, { mitraSession: ayus }), deniedFor(budi, ayus));
  await assert.rejects(client.setOnline(budi), deniedFor(budi, ayus));

  const [mine, theirs] = await Promise.allSettled([
    client.heartbeat(ayu, { mitraSession: ayus }), // coalesced into one BatchHeartbeat
    client.heartbeat(budi, { mitraSession: ayus }),
  ]);
  assert.deepEqual(mine, { status: "fulfilled", value: true });
  assert.equal(theirs?.status, "rejected");
  deniedFor(budi, ayus)((theirs as PromiseRejectedResult).reason);

  const results = await client.batchHeartbeat([ayu, budi], { mitraSessions: [ayus, ayus] });
  assert.deepEqual(results.map((r) => r.outcome), [Outcome.OUTCOME_RECORDED, Outcome.OUTCOME_SESSION_REFUSED]);
  assert.equal((await client.setOffline(ayu, { mitraSession: ayus })).online, false);
  assert.equal((await client.getMitraStatus(budi)).online, false, "Budi was never moved");
});
