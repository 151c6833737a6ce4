/** The chat backend's calls to the availability service, as Fastify routes: the mitra apps'
 * heartbeat relay and online/offline switch, admin deactivation, the customer beacon, the
 * dashboard, and load after a chat-session transition. Run it next to a server:
 * `AVAILABILITY_ADDRESS=127.0.0.1:50051 node dist/examples/chat-backend.js` (port 3000). */
import { readFileSync } from "node:fs";

import Fastify, { type FastifyInstance, type FastifyReply } from "fastify";

import { AvailabilityClient, AvailabilityError, requestId, status } from "@halo/availability-client";

/** What a caller of our HTTP API sees for each code the availability service answers. */
const HTTP_STATUS: Partial<Record<status, number>> = {
  [status.INVALID_ARGUMENT]: 400,
  [status.NOT_FOUND]: 404,
  [status.PERMISSION_DENIED]: 403, // a deactivated mitra's heartbeat
  [status.FAILED_PRECONDITION]: 409, // a deactivated mitra going online
  [status.UNAVAILABLE]: 503,
  [status.DEADLINE_EXCEEDED]: 503,
  [status.CANCELLED]: 499, // the caller hung up (or the client was closed)
};

/** Aborted when the HTTP client goes away before its answer was sent. */
function hungUp(reply: FastifyReply): AbortSignal {
  const gone = new AbortController();
  reply.raw.once("close", () => {
    if (!reply.raw.writableFinished) gone.abort();
  });
  return gone.signal;
}

export function buildApp(availability: AvailabilityClient): FastifyInstance {
  const app = Fastify();

  app.setErrorHandler((error, _request, reply) => {
    if (!(error instanceof AvailabilityError)) return reply.send(error);
    return reply.code(HTTP_STATUS[error.code as status] ?? 500).send({ error: status[error.code], details: error.details });
  });

  // Every 15-30 s from every open mitra app: concurrent ones go out as one BatchHeartbeat.
  // An app that hangs up stops waiting (its heartbeat leaves the batch if not yet sent).
  app.post<{ Params: { mitraId: string } }>("/mitras/:mitraId/heartbeat", async (request, reply) => {
    const online = await availability.heartbeat(request.params.mitraId, { signal: hungUp(reply) });
    return { online }; // false: the app was taken offline and must go online again
  });

  app.post<{ Params: { mitraId: string } }>("/mitras/:mitraId/online", async (request) => {
    const mitra = await availability.setOnline(request.params.mitraId);
    return { online: mitra.online, available: mitra.available };
  });

  app.post<{ Params: { mitraId: string } }>("/mitras/:mitraId/offline", async (request) => {
    await availability.setOffline(request.params.mitraId);
    return { online: false };
  });

  // Admin: revokes the mitra's auth sessions and takes it offline, in one transaction.
  app.post<{ Params: { mitraId: string }; Body: { active: boolean } }>(
    "/admin/mitras/:mitraId/active",
    async (request) => {
      const { status: mitra, revokedAuthSessions } = await availability.setMitraActive(
        request.params.mitraId,
        request.body.active,
      );
      return { active: mitra.active, revokedAuthSessions };
    },
  );

  // After the chat backend moves a session (accept, end, reroute, extension, expiry).
  app.post<{ Body: { mitraIds: string[] } }>("/internal/chat-sessions/moved", async (request) => {
    return Object.fromEntries(await availability.recomputeLoad(request.body.mitraIds));
  });

  // The customer app's "N counselors available now": cached cluster-wide, at most 10 s old.
  app.get("/beacon", async () => {
    const { available, asOf } = await availability.countAvailableMitras();
    return { available, asOf };
  });

  app.get("/dashboard", async () => availability.getDashboardStats(100));

  // The same numbers as server-sent events, one when they change, at most one a second.
  app.get("/dashboard/events", async (request, reply) => {
    reply.hijack();
    reply.raw.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    const closed = new AbortController();
    request.raw.on("close", () => closed.abort());
    const updates = availability.watchDashboardStats({ intervalMs: 1_000, signal: closed.signal });
    for await (const stats of updates) reply.raw.write(`data: ${JSON.stringify(stats)}\n\n`);
    reply.raw.end();
  });

  return app;
}

if (require.main === module) {
  const availability = new AvailabilityClient(process.env.AVAILABILITY_ADDRESS ?? "127.0.0.1:50051", {
    token: process.env.AVAILABILITY_TOKEN,
    tls: process.env.AVAILABILITY_CA_FILE ? { ca: readFileSync(process.env.AVAILABILITY_CA_FILE) } : undefined,
    interceptors: [requestId()],
  });
  const app = buildApp(availability);
  app.addHook("onClose", () => availability.close());
  app.listen({ port: Number(process.env.PORT ?? 3000) }).then((address) => console.log(`listening on ${address}`));
  process.once("SIGTERM", () => void app.close());
}
