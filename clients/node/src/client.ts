import {
  type ChannelCredentials,
  type ChannelOptions,
  type ClientReadableStream,
  credentials as grpcCredentials,
  Metadata,
  type ServiceError,
  status as code,
  type StatusObject,
} from "@grpc/grpc-js";
import { BinaryReader, BinaryWriter } from "@bufbuild/protobuf/wire";

import { Calls, type CallOptions, type Interceptor, MITRA_SESSION_HEADER, type PresenceCallOptions, type Start } from "./calls.js";
import { AvailabilityError, atSite, callSite } from "./errors.js";
import {
  AvailabilityServiceClient,
  AvailabilityServiceService,
  type HeartbeatResult,
  type MitraStatus as MitraStatusMessage,
  Source as SourceMessage,
} from "./gen/availability/v1/availability.js";
import {
  DashboardServiceClient,
  DashboardServiceService,
  type GetDashboardStatsResponse,
  type WatchDashboardStatsResponse,
} from "./gen/availability/v1/dashboard.js";
import { HeartbeatCoalescer, type HeartbeatStats } from "./heartbeats.js";
import { available, LiveAvailability, type LiveOptions } from "./live.js";
import type { AvailabilityCount, AvailableMitra, DashboardStats, MitraStatus, Source } from "./model.js";
import { serviceConfig } from "./serviceConfig.js";

export interface TlsOptions {
  /** PEM of the CA that signed the server's certificate; the system's roots when unset. */
  ca?: Buffer | string | undefined;
  /** PEM certificate chain and key of this client, for mutual TLS (TLS_CLIENT_CA_FILE). */
  cert?: Buffer | string | undefined;
  key?: Buffer | string | undefined;
}

export interface AvailabilityClientOptions {
  /** Deadline of every unary call in ms from when it is sent, unless the call gives its own
   * (default 5000). */
  timeoutMs?: number | undefined;
  /** Tries of a unary call that fails with UNAVAILABLE, the first included (default 4; 1: no retry). */
  attempts?: number | undefined;
  /** One of the server's AUTH_TOKENS, sent as `authorization: Bearer <token>`. */
  token?: string | undefined;
  /** Sent with every call, the streams included. */
  metadata?: Readonly<Record<string, string>> | undefined;
  /** TLS, with a client certificate for mutual TLS; plaintext when unset. */
  tls?: TlsOptions | undefined;
  /** Channel credentials built elsewhere; overrides tls. */
  credentials?: ChannelCredentials | undefined;
  /** heartbeat() calls made within this many ms of the first waiting one go out as one
   * BatchHeartbeat (default 2); 0: each is its own unary Heartbeat. */
  heartbeatWindowMs?: number | undefined;
  /** A batch goes out at once when it has this many ids (default 500, at most 5,000). */
  heartbeatBatch?: number | undefined;
  /** Unary calls on the wire at once (default 256); the rest wait in order. */
  maxInFlight?: number | undefined;
  /** Run around every unary call, the first outermost: requestId(), traceContext(),
   * observe(), or your own. */
  interceptors?: readonly Interceptor[] | undefined;
  /** Extra channel options, over this client's (keepalive, reconnect backoff, ...). */
  channelOptions?: ChannelOptions | undefined;
}

export interface WatchDashboardOptions {
  /** At most one message per interval (floor and default: 1000). */
  intervalMs?: number | undefined;
  customersPerMitraLimit?: number | undefined;
  /** Ends the stream (the loop then ends, without an error) when aborted, e.g. when the
   * HTTP request it feeds is closed. */
  signal?: AbortSignal | undefined;
  /** Headers of this stream, added to the client's. */
  metadata?: Metadata | Readonly<Record<string, string>> | undefined;
}

export interface BatchHeartbeatOptions extends CallOptions {
  /** One auth session id per mitra id, in the same order, for a caller whose presence
   * calls are bound to mitras (sent as BatchHeartbeatRequest.mitra_sessions). */
  mitraSessions?: readonly string[] | undefined;
}

/** How soon the channel tries again after a lost connection: grpc-js's defaults (1 s
 * doubling to 120 s) kept calls failing for 4.5-10 s after a restarted server was serving
 * again (issue 30). grpc-js adds +/-20 % jitter to each pause. */
const RECONNECT_OPTIONS: ChannelOptions = {
  "grpc.initial_reconnect_backoff_ms": 1_000,
  "grpc.max_reconnect_backoff_ms": 1_000,
};

const HEALTH_STATUSES = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Parameters<Start<Res>>[1],
  callback: (error: ServiceError | null, response: Res) => void,
) => ReturnType<Start<Res>>;

/** Every RPC of both services, typed; what availability.client.AvailabilityClient is in
 * Python. Every method takes CallOptions last (signal, timeoutMs, metadata). Unary calls
 * carry a deadline, are retried on UNAVAILABLE by gRPC itself (the channel's service
 * config), and pass through the interceptors and the in-flight limit. Every failure is an
 * AvailabilityError: `error.code === status.NOT_FOUND`, and so on. */
export class AvailabilityClient {
  private readonly stub: AvailabilityServiceClient;
  private readonly dashboard: DashboardServiceClient;
  private readonly headers = new Metadata();
  private readonly calls: Calls;
  private readonly heartbeats: HeartbeatCoalescer;
  private readonly watches = new Set<LiveAvailability>();

  constructor(target: string, options: AvailabilityClientOptions = {}) {
    for (const [key, value] of Object.entries(options.metadata ?? {})) this.headers.set(key, value);
    if (options.token !== undefined) this.headers.set("authorization", `Bearer ${options.token}`);
    this.calls = new Calls({
      timeoutMs: options.timeoutMs ?? 5_000,
      maxInFlight: options.maxInFlight ?? 256,
      interceptors: options.interceptors ?? [],
      headers: this.headers,
    });
    this.heartbeats = new HeartbeatCoalescer(
      async (mitraIds, mitraSessions) =>
        (await this.call("batchHeartbeat", { mitraIds, mitraSessions: mitraSessions ?? [] }, undefined)).results,
      async (mitraId, callOptions) =>
        (await this.call("heartbeat", { mitraId }, callOptions, presence(callOptions))).online,
      options.heartbeatWindowMs ?? 2,
      options.heartbeatBatch ?? 500,
    );
    const channelOptions: ChannelOptions = {
      "grpc.service_config": serviceConfig(options.attempts ?? 4),
      "grpc.enable_retries": 1,
      ...RECONNECT_OPTIONS,
      ...options.channelOptions,
    };
    this.stub = new AvailabilityServiceClient(target, channelCredentials(options), channelOptions);
    this.dashboard = new DashboardServiceClient(target, channelCredentials(options), {
      ...channelOptions,
      channelOverride: this.stub.getChannel(),
    });
  }

  /** Closes the live sets it made, sends the heartbeats still waiting for their window, then
   * closes the channel. Later calls reject with CANCELLED. */
  async close(): Promise<void> {
    for (const live of this.watches) live.close();
    await this.heartbeats.drain();
    this.calls.closed = true;
    this.stub.close();
  }

  /** Resolves once the channel is connected (connecting now if it was idle); rejects with
   * DEADLINE_EXCEEDED when it is not by deadline. E.g. at start-up, before taking traffic. */
  waitForReady(deadline: Date): Promise<void> {
    const site = callSite(this.waitForReady);
    return new Promise((resolve, reject) => {
      if (this.calls.closed) return reject(atSite(new AvailabilityError(code.CANCELLED, "the client was closed"), site));
      this.stub.waitForReady(deadline, (error) => {
        if (!error) return resolve();
        const failed = new AvailabilityError(code.DEADLINE_EXCEEDED, `not connected by ${deadline.toISOString()}: ${error.message}`, { cause: error });
        reject(atSite(failed, site));
      });
    });
  }

  /** Unary calls waiting for a place under maxInFlight right now. */
  get queued(): number {
    return this.calls.queued;
  }

  /** The server's health (grpc.health.v1) as a name: SERVING, NOT_SERVING, ... */
  health(service = "", options?: CallOptions): Promise<string> {
    const start: Start<string> = (metadata, callOptions, callback) =>
      this.stub.makeUnaryRequest(
        "/grpc.health.v1.Health/Check",
        (request: string) => Buffer.from(new BinaryWriter().uint32(10).string(request).finish()),
        healthStatus,
        service,
        metadata,
        callOptions,
        callback,
      );
    return this.calls.unary("/grpc.health.v1.Health/Check", service, start, options, callSite(this.health));
  }

  async setOnline(mitraId: string, options?: PresenceCallOptions): Promise<MitraStatus> {
    return status((await this.call("setOnline", { mitraId }, options, presence(options))).status);
  }

  /** Idempotent. */
  async setOffline(mitraId: string, options?: PresenceCallOptions): Promise<MitraStatus> {
    return status((await this.call("setOffline", { mitraId }, options, presence(options))).status);
  }

  /** The hot path. False: the mitra was taken offline; its app must call setOnline again.
   * Rejects with PERMISSION_DENIED when the mitra is deactivated (or its session refused),
   * NOT_FOUND when unknown. Concurrent calls are coalesced into one BatchHeartbeat
   * (heartbeatWindowMs); each gets what a unary Heartbeat would have answered. */
  heartbeat(mitraId: string, options?: PresenceCallOptions): Promise<boolean> {
    return this.heartbeats.heartbeat(mitraId, options);
  }

  /** What heartbeat() sent so far: calls, BatchHeartbeat calls and unary Heartbeat calls. */
  get heartbeatStats(): Readonly<HeartbeatStats> {
    return this.heartbeats.stats;
  }

  /** Many apps' heartbeats in one call (up to 5,000 ids), one result per id in request
   * order; a bad, unknown or deactivated id never fails the call. heartbeat() uses it. */
  async batchHeartbeat(mitraIds: readonly string[], options?: BatchHeartbeatOptions): Promise<HeartbeatResult[]> {
    const request = { mitraIds: [...mitraIds], mitraSessions: [...(options?.mitraSessions ?? [])] };
    return (await this.call("batchHeartbeat", request, options)).results;
  }

  /** Deactivating revokes the mitra's auth sessions and takes it offline. A retried
   * deactivation that had committed reports 0 revoked sessions the second time. */
  async setMitraActive(
    mitraId: string,
    active: boolean,
    options?: CallOptions,
  ): Promise<{ status: MitraStatus; revokedAuthSessions: number }> {
    const reply = await this.call("setMitraActive", { mitraId, active }, options);
    return { status: status(reply.status), revokedAuthSessions: reply.revokedAuthSessions };
  }

  async getMitraStatus(mitraId: string, options?: CallOptions): Promise<MitraStatus> {
    return status((await this.call("getMitraStatus", { mitraId }, options)).status);
  }

  async isMitraReachable(mitraId: string, options?: CallOptions): Promise<boolean> {
    return (await this.call("isMitraReachable", { mitraId }, options)).reachable;
  }

  /** The pairing blast: least loaded first, then longest idle. */
  async findAvailableMitras(limit = 100, exclude: Iterable<string> = [], options?: CallOptions): Promise<AvailableMitra[]> {
    const reply = await this.call("findAvailableMitras", { limit, excludeMitraIds: [...exclude] }, options);
    return reply.mitras.map(available);
  }

  /** The beacon: cached cluster-wide, at most BEACON_TTL_SECONDS old. */
  async countAvailableMitras(options?: CallOptions): Promise<AvailabilityCount> {
    const reply = await this.call("countAvailableMitras", {}, options);
    return {
      available: reply.availableCount,
      online: reply.onlineCount,
      asOf: reply.asOf ?? new Date(0),
      source: source(reply.source),
    };
  }

  /** Recomputes load from chat_sessions; call after every chat-session transition. */
  async recomputeLoad(mitraIds: Iterable<string>, options?: CallOptions): Promise<Map<string, number>> {
    const reply = await this.call("recomputeLoad", { mitraIds: [...mitraIds] }, options);
    return new Map(reply.loads.map((m) => [m.mitraId, m.load]));
  }

  async getDashboardStats(customersPerMitraLimit = 0, options?: CallOptions): Promise<DashboardStats> {
    const method = DashboardServiceService.getDashboardStats.path;
    const request = { customersPerMitraLimit };
    const start = unaryStart(this.dashboard, this.dashboard.getDashboardStats, request);
    return dashboardStats(await this.calls.unary(method, request, start, options, callSite(this.getDashboardStats)));
  }

  /** A new DashboardStats whenever the numbers change, at most one per interval. Ends the
   * stream when the loop is left (break, return or throw) or the signal aborts. */
  async *watchDashboardStats(options: WatchDashboardOptions = {}): AsyncGenerator<DashboardStats> {
    const intervalMs = options.intervalMs ?? 1_000;
    if (this.calls.closed) throw new AvailabilityError(code.CANCELLED, "the client was closed");
    const call = this.dashboard.watchDashboardStats(
      {
        interval: { seconds: Math.floor(intervalMs / 1000), nanos: (intervalMs % 1000) * 1e6 },
        customersPerMitraLimit: options.customersPerMitraLimit ?? 0,
      },
      this.calls.metadata(options),
    );
    for await (const reply of messages(call, options.signal)) yield dashboardStats(reply);
  }

  /** The live set of available mitras, following WatchAvailableMitras from now on; it
   * resumes by revision on its own after any interruption. close() it when done. */
  watchAvailable(options: LiveOptions = {}): LiveAvailability {
    const live = new LiveAvailability(this.stub, () => this.calls.metadata(options), options);
    this.watches.add(live);
    live.once("close", () => this.watches.delete(live));
    return live;
  }

  /** One unary call of AvailabilityService by its method's name. */
  private call<K extends keyof typeof AvailabilityServiceService>(
    name: K,
    request: Parameters<AvailabilityServiceClient[K]>[0],
    options: CallOptions | undefined,
    extra?: Metadata,
  ): Promise<ReturnType<(typeof AvailabilityServiceService)[K]["responseDeserialize"]>> {
    const definition = AvailabilityServiceService[name];
    const method = this.stub[name] as unknown as UnaryMethod<typeof request, ReturnType<(typeof definition)["responseDeserialize"]>>;
    return this.calls.unary(definition.path, request, unaryStart(this.stub, method, request), options, callSite(this.call), extra);
  }
}

function unaryStart<Req, Res>(client: object, method: UnaryMethod<Req, Res>, request: Req): Start<Res> {
  return (metadata, options, callback) => method.call(client, request, metadata, options, callback as (error: ServiceError | null, response: Res) => void);
}

/** x-mitra-session for a presence call that names its mitra's session. */
function presence(options: PresenceCallOptions | undefined): Metadata | undefined {
  if (options?.mitraSession === undefined) return undefined;
  const metadata = new Metadata();
  metadata.set(MITRA_SESSION_HEADER, options.mitraSession);
  return metadata;
}

function healthStatus(bytes: Buffer): string {
  const reader = new BinaryReader(bytes);
  let value = 0;
  while (reader.pos < reader.len) {
    const tag = reader.uint32();
    if (tag >>> 3 === 1) value = reader.int32();
    else reader.skip(tag & 7);
  }
  return HEALTH_STATUSES[value] ?? String(value);
}

function channelCredentials(options: AvailabilityClientOptions): ChannelCredentials {
  if (options.credentials) return options.credentials;
  if (!options.tls) return grpcCredentials.createInsecure();
  const pem = (value: Buffer | string | undefined) => (typeof value === "string" ? Buffer.from(value) : value);
  return grpcCredentials.createSsl(pem(options.tls.ca), pem(options.tls.key), pem(options.tls.cert));
}

/** A server stream's messages, in order; leaving the loop, or signal, cancels the call. */
async function* messages<T>(call: ClientReadableStream<T>, signal?: AbortSignal): AsyncGenerator<T> {
  const queue: T[] = [];
  let ended: StatusObject | undefined;
  let wake: (() => void) | undefined;
  const abort = () => call.cancel();
  if (signal?.aborted) abort();
  signal?.addEventListener("abort", abort, { once: true });
  call.on("data", (message: T) => {
    queue.push(message);
    wake?.();
  });
  call.on("error", () => {}); // the status says it
  call.on("status", (status: StatusObject) => {
    ended = status;
    wake?.();
  });
  try {
    for (;;) {
      while (queue.length > 0) yield queue.shift() as T;
      if (ended) {
        if (ended.code !== 0 && !signal?.aborted) {
          throw new AvailabilityError(ended.code, ended.details, { metadata: ended.metadata });
        }
        return;
      }
      await new Promise<void>((resolve) => (wake = resolve));
      wake = undefined;
    }
  } finally {
    signal?.removeEventListener("abort", abort);
    if (!ended) call.cancel();
  }
}

const SOURCES: Partial<Record<SourceMessage, Source>> = {
  [SourceMessage.SOURCE_CACHE]: "cache",
  [SourceMessage.SOURCE_DATABASE]: "database",
};

function source(value: SourceMessage): Source {
  return SOURCES[value] ?? "database";
}

function status(value: MitraStatusMessage | undefined): MitraStatus {
  const m = value!;
  return {
    mitraId: m.mitraId,
    displayName: m.displayName,
    online: m.online,
    active: m.active,
    fresh: m.fresh,
    reachable: m.reachable,
    available: m.available,
    load: m.load,
    maxConcurrentSessions: m.maxConcurrentSessions,
    lastHeartbeatAt: m.lastHeartbeatTime ?? null,
    source: source(m.source),
  };
}

function dashboardStats(value: GetDashboardStatsResponse | WatchDashboardStatsResponse): DashboardStats {
  const sensitive = value.sensitive;
  return {
    activeChats: value.activeChats,
    onlineMitras: value.onlineMitras,
    pendingRequests: value.pendingRequests,
    customersPerMitra: value.customersPerMitra.map((m) => ({
      mitraId: m.mitraId,
      displayName: m.displayName,
      activeSessionCount: m.activeSessionCount,
    })),
    sensitive: {
      total: sensitive?.total ?? 0,
      last30dTotal: sensitive?.last30dTotal ?? 0,
      last30dSensitive: sensitive?.last30dSensitive ?? 0,
      last30dPercent: sensitive?.last30dPercent ?? 0,
    },
    asOf: value.asOf ?? new Date(0),
    source: source(value.source),
  };
}
