/** inSync comes only from what a stream proves. A resume refused after headers that carry no
 * revision (what a proxy in front of a refusing server can relay; our server refuses without
 * headers, so a stand-in server forces it here) must never mark the old set in sync. */
import assert from "node:assert/strict";
import { test } from "node:test";

import { Metadata, Server, ServerCredentials, type ServerWritableStream, status } from "@grpc/grpc-js";

import { AvailabilityClient, REVISION_HEADER } from "@halo/availability-client";
import {
  AvailabilityServiceService,
  type WatchAvailableMitrasRequest,
  type WatchAvailableMitrasResponse,
} from "../src/gen/availability/v1/availability";
import { eventually } from "./harness";

type Watch = ServerWritableStream<WatchAvailableMitrasRequest, WatchAvailableMitrasResponse>;

test("a refused resume never puts the old set in sync, not even for a moment", async () => {
  const resumes: number[] = [];
  const server = new Server();
  server.addService(AvailabilityServiceService, {
    watchAvailableMitras(call: Watch) {
      const headers = new Metadata();
      if (resumes.length === 0 && !call.request.resumeRevision) {
        headers.set(REVISION_HEADER, "5");
        call.sendMetadata(headers);
        const mitra = { mitraId: "m-1", displayName: "Ayu", load: 0, maxConcurrentSessions: 2 };
        call.write({ revision: 5, snapshot: { mitras: [mitra], part: 0, parts: 1 } });
        call.end(); // the server went away: the client resumes from revision 5
        return;
      }
      resumes.push(Number(call.request.resumeRevision ?? 0));
      call.sendMetadata(headers); // headers, but no revision in them
      call.emit("error", { code: status.UNAVAILABLE, details: "the Valkey mirror is unreachable" });
    },
  } as never);
  const port = await new Promise<number>((done, fail) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (error, bound) =>
      error ? fail(error) : done(bound),
    ),
  );
  const client = new AvailabilityClient(`127.0.0.1:${port}`);
  const live = client.watchAvailable({ maxBackoffMs: 100 });
  const syncs: boolean[] = [];
  live.on("sync", (inSync) => syncs.push(inSync));
  try {
    await eventually(() => resumes.length >= 5, 10_000, "five refused resumes");
    assert.deepEqual(syncs, [true, false]);
    assert.equal(live.inSync, false);
    assert.ok(resumes.every((revision) => revision === 5), JSON.stringify(resumes));
    assert.deepEqual([...live.mitras.keys()], ["m-1"], "the old set is kept, not trusted");
  } finally {
    live.close();
    await client.close();
    server.forceShutdown();
  }
});
