// A backend that installed the packed tarball: test/package.test.ts compiles this one text
// as consumer.mts (ESM) and consumer.cts (CJS), strict with exactOptionalPropertyTypes, and
// runs both against a real `availability serve`. It calls every method once.
import { createRequire } from "node:module";
import { join } from "node:path";

import {
  AvailabilityClient,
  type AvailabilityClientOptions,
  AvailabilityError,
  type CallOptions,
  type CallRecord,
  HeartbeatOutcome,
  Metadata,
  observe,
  requestId,
  status,
  traceContext,
} from "@halo/availability-client";

/** The other build of the package, whichever this one is (the ESM one from a CJS consumer). */
interface Build {
  AvailabilityClient: unknown;
  AvailabilityError: new (code: status, details: string) => Error;
}

async function main(): Promise<object> {
  const [address, ayu, budi] = process.argv.slice(2) as [string, string, string];
  const records: CallRecord[] = [];
  // Values that may be undefined, passed as they are (the README's own example).
  const options: AvailabilityClientOptions = {
    token: process.env.AVAILABILITY_TOKEN,
    timeoutMs: process.env.AVAILABILITY_TIMEOUT_MS === undefined ? undefined : Number(process.env.AVAILABILITY_TIMEOUT_MS),
    heartbeatWindowMs: 5,
    maxInFlight: 64,
    interceptors: [
      requestId(),
      traceContext((carrier) => {
        carrier.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
      }),
      observe((call) => records.push(call)),
    ],
  };
  const client = new AvailabilityClient(address, options);
  const request = new AbortController();
  const maybeSignal: AbortSignal | undefined = process.env.NO_SIGNAL ? undefined : request.signal;
  const call: CallOptions = { signal: maybeSignal, timeoutMs: undefined, metadata: { "x-request-id": "consumer-1" } };
  const headers = new Metadata();
  headers.set("x-request-id", "consumer-2");

  await client.waitForReady(new Date(Date.now() + 10_000));
  const health = await client.health("", call);
  const online = await client.setOnline(ayu, { ...call, mitraSession: undefined });
  const beat = await client.heartbeat(ayu, { signal: maybeSignal, mitraSession: undefined });
  const [batched] = await client.batchHeartbeat([ayu], { metadata: headers, mitraSessions: undefined });
  const loads = await client.recomputeLoad([ayu], call);
  const current = await client.getMitraStatus(ayu, call);
  const reachable = await client.isMitraReachable(ayu, call);
  const found = await client.findAvailableMitras(10, [budi], call);
  const count = await client.countAvailableMitras(call);
  const dashboard = await client.getDashboardStats(10, call);
  let watched = -1;
  for await (const stats of client.watchDashboardStats({ intervalMs: 1_000, signal: maybeSignal, metadata: undefined })) {
    watched = stats.onlineMitras;
    break;
  }
  const live = client.watchAvailable({ maxBackoffMs: undefined });
  await live.waitInSync(20_000);
  const liveIds = [...live.mitras.keys()];
  live.close();
  const { status: deactivated, revokedAuthSessions } = await client.setMitraActive(budi, false, call);
  const offline = await client.setOffline(ayu, call);

  const esm: Build = await import("@halo/availability-client");
  const cjs = createRequire(join(process.cwd(), "consumer.js"))("@halo/availability-client") as Build;
  const notFound = await client.getMitraStatus("00000000-0000-0000-0000-00000000beef").catch((e: unknown) => e);
  const refused = await client.heartbeat(budi).catch((e: unknown) => e);
  await client.close();
  const closed = await client.countAvailableMitras().catch((e: unknown) => e);
  const fromOther = new (AvailabilityClient === cjs.AvailabilityClient ? esm : cjs).AvailabilityError(status.INTERNAL, "x");

  const described = (error: unknown) =>
    error instanceof AvailabilityError
      ? { code: status[error.code], esm: error instanceof esm.AvailabilityError, cjs: error instanceof cjs.AvailabilityError }
      : { notAnAvailabilityError: String(error) };
  return {
    loaded: AvailabilityClient === cjs.AvailabilityClient ? "cjs" : AvailabilityClient === esm.AvailabilityClient ? "esm" : "?",
    health,
    online: online.online,
    beat,
    batched: batched?.outcome === HeartbeatOutcome.OUTCOME_RECORDED,
    loads: Object.fromEntries(loads),
    current: [current.load, current.source],
    reachable,
    found: found.map((m) => m.mitraId),
    available: count.available,
    activeChats: dashboard.activeChats,
    watched,
    liveIds,
    deactivated: !deactivated.active,
    revokedAuthSessions,
    offline: !offline.online,
    notFound: described(notFound),
    refused: described(refused),
    closed: described(closed),
    otherBuildsError: fromOther instanceof AvailabilityError,
    records: records.map((r) => `${r.method.split("/").pop()} ${status[r.code]} ${r.requestId ? "id" : "no id"}`),
  };
}

main().then(
  (result) => console.log(JSON.stringify(result)),
  (error: unknown) => {
    console.error(error);
    process.exit(1);
  },
);
