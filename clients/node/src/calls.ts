import { type CallOptions as GrpcCallOptions, type ClientUnaryCall, Metadata, type ServiceError, status } from "@grpc/grpc-js";

import { AvailabilityError, atSite, type CallSite } from "./errors.js";

/** Options every method takes as its last argument. Each property may be given as
 * `undefined` (an `exactOptionalPropertyTypes` caller can pass `{ signal: maybeSignal }`). */
export interface CallOptions {
  /** Aborting cancels the call: on the wire when it was sent (the server sees CANCELLED),
   * or before it leaves the in-flight queue. The promise rejects with CANCELLED. */
  signal?: AbortSignal | undefined;
  /** Deadline of this call in ms, from when it is sent (the client's `timeoutMs` otherwise);
   * time spent waiting in the in-flight queue is bounded by `signal`, not by this. */
  timeoutMs?: number | undefined;
  /** Headers of this call, added to the client's (e.g. x-request-id). */
  metadata?: Metadata | Readonly<Record<string, string>> | undefined;
}

/** setOnline, setOffline and heartbeat: presence calls. */
export interface PresenceCallOptions extends CallOptions {
  /** The mitra's auth session id (auth_sessions.id), for a caller whose presence calls are
   * bound to mitras (`bind_presence` in its callers entry): sent as `x-mitra-session`, or in
   * `mitra_sessions` when the heartbeat goes out in a BatchHeartbeat. */
  mitraSession?: string | undefined;
}

/** A unary call as interceptors see it, before it is sent. `metadata` is this call's own
 * copy: set headers on it (a request id, trace context). */
export interface Call {
  /** The gRPC path, e.g. `/availability.v1.AvailabilityService/SetOnline`. */
  readonly method: string;
  readonly request: unknown;
  readonly metadata: Metadata;
}

/** Runs around every unary call, in the order given (the first is outermost), in the
 * caller's async context (so AsyncLocalStorage, e.g. OpenTelemetry's context, is the
 * caller's). Call `next()` to go on; it resolves with the response or rejects with an
 * AvailabilityError. */
export type Interceptor = (call: Call, next: () => Promise<unknown>) => Promise<unknown>;

export const MITRA_SESSION_HEADER = "x-mitra-session";

/** Starts one grpc-js unary call. */
export type Start<Res> = (
  metadata: Metadata,
  options: Partial<GrpcCallOptions>,
  callback: (error: ServiceError | null, response?: Res) => void,
) => ClientUnaryCall;

/** At most `limit` unary calls on the wire; the rest wait in order. 10,000 calls sent at
 * once overflow the server's gRPC core, which cancels or times them out before they reach
 * the service (issue 30); queued here, they all get through. */
class InFlight {
  private active = 0;
  private readonly waiting: Array<{ go: () => void; gone: boolean }> = [];

  constructor(private readonly limit: number) {
    if (!Number.isInteger(limit) || limit < 1) throw new RangeError(`maxInFlight must be an integer >= 1, got ${limit}`);
  }

  get queued(): number {
    return this.waiting.length;
  }

  acquire(signal: AbortSignal | undefined): Promise<void> {
    if (this.active < this.limit) {
      this.active += 1;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const entry = {
        gone: false,
        go: () => {
          signal?.removeEventListener("abort", onAbort);
          resolve();
        },
      };
      const onAbort = () => {
        entry.gone = true;
        reject(aborted(signal!));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.waiting.push(entry);
    });
  }

  release(): void {
    for (let next = this.waiting.shift(); next; next = this.waiting.shift()) {
      if (!next.gone) return next.go(); // the slot passes on
    }
    this.active -= 1;
  }
}

export function aborted(signal: AbortSignal): AvailabilityError {
  return new AvailabilityError(status.CANCELLED, "the call was aborted", { cause: signal.reason });
}

export interface CallsOptions {
  timeoutMs: number;
  maxInFlight: number;
  interceptors: readonly Interceptor[];
  /** The client's own headers (token, client-wide metadata), copied into every call. */
  headers: Metadata;
}

/** The one path of every unary call: interceptors, the in-flight limit, the deadline, the
 * abort signal, and errors as AvailabilityError with the caller's stack. */
export class Calls {
  closed = false;
  private readonly inFlight: InFlight;

  constructor(private readonly options: CallsOptions) {
    if (!(options.timeoutMs > 0)) throw new RangeError(`timeoutMs must be > 0, got ${options.timeoutMs}`);
    this.inFlight = new InFlight(options.maxInFlight);
  }

  /** Calls waiting for a place under maxInFlight. */
  get queued(): number {
    return this.inFlight.queued;
  }

  /** The client's headers, this call's metadata over them. */
  metadata(options: CallOptions | undefined): Metadata {
    const metadata = this.options.headers.clone();
    const own = options?.metadata;
    if (own instanceof Metadata) metadata.merge(own);
    else if (own) for (const [key, value] of Object.entries(own)) metadata.set(key, value);
    return metadata;
  }

  async unary<Res>(method: string, request: unknown, start: Start<Res>, options: CallOptions | undefined, site: CallSite, extra?: Metadata): Promise<Res> {
    const metadata = this.metadata(options);
    if (extra) metadata.merge(extra);
    const call: Call = { method, request, metadata };
    const signal = options?.signal;
    const timeoutMs = options?.timeoutMs ?? this.options.timeoutMs;
    if (!(timeoutMs > 0)) throw new RangeError(`timeoutMs must be > 0, got ${timeoutMs}`);
    let next = (): Promise<unknown> => this.send(start, metadata, signal, timeoutMs);
    for (const interceptor of [...this.options.interceptors].reverse()) {
      const inner = next;
      next = () => interceptor(call, inner);
    }
    try {
      return (await next()) as Res;
    } catch (error) {
      throw atSite(AvailabilityError.from(error), site);
    }
  }

  private async send<Res>(start: Start<Res>, metadata: Metadata, signal: AbortSignal | undefined, timeoutMs: number): Promise<Res> {
    if (signal?.aborted) throw aborted(signal);
    await this.inFlight.acquire(signal);
    try {
      return await new Promise<Res>((resolve, reject) => {
        if (this.closed) return reject(new AvailabilityError(status.CANCELLED, "the client was closed"));
        if (signal?.aborted) return reject(aborted(signal));
        const onAbort = () => call.cancel();
        let call: ClientUnaryCall;
        try {
          call = start(metadata, { deadline: Date.now() + timeoutMs }, (error, response) => {
            signal?.removeEventListener("abort", onAbort);
            if (!error) return resolve(response as Res);
            if (signal?.aborted) return reject(new AvailabilityError(status.CANCELLED, "the call was aborted", { metadata: error.metadata, cause: signal.reason }));
            reject(AvailabilityError.from(error));
          });
        } catch (error) {
          // grpc-js throws when its channel was closed under a call in the queue.
          return reject(new AvailabilityError(status.CANCELLED, "the client was closed", { cause: error }));
        }
        signal?.addEventListener("abort", onAbort, { once: true });
      });
    } finally {
      this.inFlight.release();
    }
  }
}
