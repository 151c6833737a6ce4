import {
  type CallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  type ClientReadableStream,
  type ClientUnaryCall,
  credentials as grpcCredentials,
  Metadata,
  type ServiceError,
  type StatusObject,
} from "@grpc/grpc-js";
import { BinaryReader, BinaryWriter } from "@bufbuild/protobuf/wire";

import {
  AvailabilityServiceClient,
  type HeartbeatResult,
  type MitraStatus as MitraStatusMessage,
  Source as SourceMessage,
} from "./gen/availability/v1/availability";
import {
  DashboardServiceClient,
  type GetDashboardStatsResponse,
  type WatchDashboardStatsResponse,
} from "./gen/availability/v1/dashboard";
import { statusError } from "./errors";
import { HeartbeatCoalescer, type HeartbeatStats } from "./heartbeats";
import { available, LiveAvailability, type LiveOptions } from "./live";
import type { AvailabilityCount, AvailableMitra, DashboardStats, MitraStatus, Source } from "./model";
import { serviceConfig } from "./serviceConfig";

export interface TlsOptions {
  /** PEM of the CA that signed the server's certificate; the system's roots when unset. */
  ca?: Buffer | string;
  /** PEM certificate chain and key of this client, for mutual TLS (TLS_CLIENT_CA_FILE). */
  cert?: Buffer | string;
  key?: Buffer | string;
}

export interface AvailabilityClientOptions {
  /** Deadline of every unary call (default 5000). */
  timeoutMs?: number;
  /** Tries of a unary call that fails with UNAVAILABLE, the first included (default 4; 1: no retry). */
  attempts?: number;
  /** One of the server's AUTH_TOKENS, sent as `authorization: Bearer <token>`. */
  token?: string;
  /** Sent with every call (e.g. x-request-id for the server's logs). */
  metadata?: Record<string, string>;
  /** TLS, with a client certificate for mutual TLS; plaintext when unset. */
  tls?: TlsOptions;
  /** Channel credentials built elsewhere; overrides tls. */
  credentials?: ChannelCredentials;
  /** heartbeat() calls made within this many ms of the first waiting one go out as one
   * BatchHeartbeat (default 2); 0: each is its own unary Heartbeat. */
  heartbeatWindowMs?: number;
  /** A batch goes out at once when it has this many ids (default 500, at most 5,000). */
  heartbeatBatch?: number;
  /** Extra channel options (grpc.keepalive_time_ms, grpc.max_reconnect_backoff_ms, ...). */
  channelOptions?: ChannelOptions;
}

export interface WatchDashboardOptions {
  /** At most one message per interval (floor and default: 1000). */
  intervalMs?: number;
  customersPerMitraLimit?: number;
  /** Ends the stream (the loop then ends, without an error) when aborted, e.g. when the
   * HTTP request it feeds is closed. */
  signal?: AbortSignal;
}

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

const HEALTH_STATUSES = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];

/** Every RPC of both services, typed; what availability.client.AvailabilityClient is in
 * Python. Unary calls carry a deadline and are retried on UNAVAILABLE by gRPC itself (the
 * channel's service config). Errors are grpc-js ServiceErrors with the codes of the API:
 * `error.code === status.NOT_FOUND`, and so on. */
export class AvailabilityClient {
  private readonly stub: AvailabilityServiceClient;
  private readonly dashboard: DashboardServiceClient;
  private readonly headers = new Metadata();
  private readonly heartbeats: HeartbeatCoalescer;
  private readonly watches = new Set<LiveAvailability>();

  constructor(target: string, options: AvailabilityClientOptions = {}) {
    this.heartbeats = new HeartbeatCoalescer(
      async (mitraIds) => (await this.call(this.stub.batchHeartbeat, { mitraIds })).results,
      async (mitraId) => (await this.call(this.stub.heartbeat, { mitraId })).online,
      options.heartbeatWindowMs ?? 2,
      options.heartbeatBatch ?? 500,
    );
    const channelOptions: ChannelOptions = {
      "grpc.service_config": serviceConfig(options.timeoutMs ?? 5_000, options.attempts ?? 4),
      "grpc.enable_retries": 1,
      ...options.channelOptions,
    };
    this.stub = new AvailabilityServiceClient(target, channelCredentials(options), channelOptions);
    this.dashboard = new DashboardServiceClient(target, channelCredentials(options), {
      ...channelOptions,
      channelOverride: this.stub.getChannel(),
    });
    for (const [key, value] of Object.entries(options.metadata ?? {})) this.headers.set(key, value);
    if (options.token !== undefined) this.headers.set("authorization", `Bearer ${options.token}`);
  }

  /** Closes the live sets it made, sends the heartbeats still waiting for their window, then
   * closes the channel. */
  async close(): Promise<void> {
    for (const live of this.watches) live.close();
    await this.heartbeats.drain();
    this.stub.close();
  }

  /** The server's health (grpc.health.v1) as a name: SERVING, NOT_SERVING, ... */
  health(service = ""): Promise<string> {
    return new Promise((resolve, reject) => {
      this.stub.makeUnaryRequest(
        "/grpc.health.v1.Health/Check",
        (request: string) => Buffer.from(new BinaryWriter().uint32(10).string(request).finish()),
        (bytes: Buffer) => {
          const reader = new BinaryReader(bytes);
          let code = 0;
          while (reader.pos < reader.len) {
            const tag = reader.uint32();
            if (tag >>> 3 === 1) code = reader.int32();
            else reader.skip(tag & 7);
          }
          return HEALTH_STATUSES[code] ?? String(code);
        },
        service,
        this.headers.clone(),
        {},
        (error: ServiceError | null, value?: string) => (error ? reject(error) : resolve(value!)),
      );
    });
  }

  async setOnline(mitraId: string): Promise<MitraStatus> {
    return status((await this.call(this.stub.setOnline, { mitraId })).status);
  }

  /** Idempotent. */
  async setOffline(mitraId: string): Promise<MitraStatus> {
    return status((await this.call(this.stub.setOffline, { mitraId })).status);
  }

  /** The hot path. False: the mitra was taken offline; its app must call setOnline again.
   * Rejects with PERMISSION_DENIED when the mitra is deactivated, NOT_FOUND when unknown.
   * Concurrent calls are coalesced into one BatchHeartbeat (heartbeatWindowMs); each gets
   * what a unary Heartbeat would have answered. */
  heartbeat(mitraId: string): Promise<boolean> {
    return this.heartbeats.heartbeat(mitraId);
  }

  /** What heartbeat() sent so far: calls, BatchHeartbeat calls and unary Heartbeat calls. */
  get heartbeatStats(): Readonly<HeartbeatStats> {
    return this.heartbeats.stats;
  }

  /** Many apps' heartbeats in one call (up to 5,000 ids), one result per id in request
   * order; a bad, unknown or deactivated id never fails the call. heartbeat() uses it. */
  async batchHeartbeat(mitraIds: string[]): Promise<HeartbeatResult[]> {
    return (await this.call(this.stub.batchHeartbeat, { mitraIds })).results;
  }

  /** Deactivating revokes the mitra's auth sessions and takes it offline. A retried
   * deactivation that had committed reports 0 revoked sessions the second time. */
  async setMitraActive(
    mitraId: string,
    active: boolean,
  ): Promise<{ status: MitraStatus; revokedAuthSessions: number }> {
    const reply = await this.call(this.stub.setMitraActive, { mitraId, active });
    return { status: status(reply.status), revokedAuthSessions: reply.revokedAuthSessions };
  }

  async getMitraStatus(mitraId: string): Promise<MitraStatus> {
    return status((await this.call(this.stub.getMitraStatus, { mitraId })).status);
  }

  async isMitraReachable(mitraId: string): Promise<boolean> {
    return (await this.call(this.stub.isMitraReachable, { mitraId })).reachable;
  }

  /** The pairing blast: least loaded first, then longest idle. */
  async findAvailableMitras(limit = 100, exclude: Iterable<string> = []): Promise<AvailableMitra[]> {
    const reply = await this.call(this.stub.findAvailableMitras, { limit, excludeMitraIds: [...exclude] });
    return reply.mitras.map(available);
  }

  /** The beacon: cached cluster-wide, at most BEACON_TTL_SECONDS old. */
  async countAvailableMitras(): Promise<AvailabilityCount> {
    const reply = await this.call(this.stub.countAvailableMitras, {});
    return {
      available: reply.availableCount,
      online: reply.onlineCount,
      asOf: reply.asOf ?? new Date(0),
      source: source(reply.source),
    };
  }

  /** Recomputes load from chat_sessions; call after every chat-session transition. */
  async recomputeLoad(mitraIds: Iterable<string>): Promise<Map<string, number>> {
    const reply = await this.call(this.stub.recomputeLoad, { mitraIds: [...mitraIds] });
    return new Map(reply.loads.map((m) => [m.mitraId, m.load]));
  }

  async getDashboardStats(customersPerMitraLimit = 0): Promise<DashboardStats> {
    return dashboardStats(
      await this.call(this.dashboard.getDashboardStats, { customersPerMitraLimit }, this.dashboard),
    );
  }

  /** A new DashboardStats whenever the numbers change, at most one per interval. Ends the
   * stream when the loop is left (break, return or throw). */
  async *watchDashboardStats(options: WatchDashboardOptions = {}): AsyncGenerator<DashboardStats> {
    const intervalMs = options.intervalMs ?? 1_000;
    const call = this.dashboard.watchDashboardStats(
      {
        interval: { seconds: Math.floor(intervalMs / 1000), nanos: (intervalMs % 1000) * 1e6 },
        customersPerMitraLimit: options.customersPerMitraLimit ?? 0,
      },
      this.headers.clone(),
    );
    for await (const reply of messages(call, options.signal)) yield dashboardStats(reply);
  }

  /** The live set of available mitras, following WatchAvailableMitras from now on; it
   * resumes by revision on its own after any interruption. close() it when done. */
  watchAvailable(options: LiveOptions = {}): LiveAvailability {
    const live = new LiveAvailability(this.stub, () => this.headers.clone(), options);
    this.watches.add(live);
    live.once("close", () => this.watches.delete(live));
    return live;
  }

  private call<Req, Res>(
    method: UnaryMethod<Req, Res>,
    request: Req,
    client: AvailabilityServiceClient | DashboardServiceClient = this.stub,
  ): Promise<Res> {
    return new Promise((resolve, reject) => {
      method.call(client, request, this.headers.clone(), {}, (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });
  }
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
        if (ended.code !== 0 && !signal?.aborted) throw statusError(ended.code, ended.details, ended.metadata);
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
