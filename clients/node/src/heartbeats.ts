import { status } from "@grpc/grpc-js";

import { aborted, type PresenceCallOptions } from "./calls.js";
import { AvailabilityError, atSite, type CallSite, callSite } from "./errors.js";
import { type HeartbeatResult, HeartbeatResult_Outcome as Outcome } from "./gen/availability/v1/availability.js";

/** The most ids one BatchHeartbeat may carry (the server refuses more). */
export const MAX_BATCH = 5_000;

export interface HeartbeatStats {
  /** heartbeat() calls made */
  heartbeats: number;
  /** BatchHeartbeat calls sent */
  batches: number;
  /** unary Heartbeat calls sent (window off, a call with its own metadata, or a server
   * without BatchHeartbeat) */
  unary: number;
}

interface Waiter {
  mitraId: string;
  session: string | undefined;
  site: CallSite;
  settled: boolean;
  resolve(online: boolean): void;
  reject(error: AvailabilityError): void;
}

/** mitraSessions: one per id, in order, or undefined when no heartbeat of the batch has one. */
type SendBatch = (mitraIds: string[], mitraSessions: string[] | undefined) => Promise<HeartbeatResult[]>;
type SendOne = (mitraId: string, options: PresenceCallOptions | undefined) => Promise<boolean>;

/** Concurrent heartbeats sent together: those made within windowMs of the first, or
 * maxBatch of them, go out as one BatchHeartbeat, and each caller gets what a unary
 * Heartbeat would have given it. gRPC's per-call cost, not Valkey, bounds the hot path;
 * one call for many heartbeats is the way past it (issue 17). */
export class HeartbeatCoalescer {
  readonly stats: HeartbeatStats = { heartbeats: 0, batches: 0, unary: 0 };
  private pending: Waiter[] = [];
  private timer: NodeJS.Timeout | undefined;
  private readonly inFlight = new Set<Promise<void>>();
  /** The server answered UNIMPLEMENTED (a version before BatchHeartbeat): unary from then on. */
  private batchUnsupported = false;

  constructor(
    private readonly sendBatch: SendBatch,
    private readonly sendOne: SendOne,
    private readonly windowMs: number,
    private readonly maxBatch: number,
  ) {
    if (!(windowMs >= 0)) throw new RangeError(`heartbeatWindowMs must be >= 0, got ${windowMs}`);
    if (!Number.isInteger(maxBatch) || maxBatch < 1 || maxBatch > MAX_BATCH) {
      throw new RangeError(`heartbeatBatch must be an integer in 1..${MAX_BATCH}, got ${maxBatch}`);
    }
  }

  /** A call with metadata of its own goes alone: a batch carries one set of headers. A
   * signal or timeoutMs ends this caller's wait; the batch goes on for the others. */
  heartbeat(mitraId: string, options: PresenceCallOptions | undefined): Promise<boolean> {
    this.stats.heartbeats += 1;
    if (this.windowMs === 0 || this.batchUnsupported || options?.metadata !== undefined) return this.unary(mitraId, options);
    const signal = options?.signal;
    if (signal?.aborted) return Promise.reject(aborted(signal));
    const site = callSite(this.heartbeat);
    return new Promise<boolean>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const end = () => {
        waiter.settled = true;
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
      };
      const waiter: Waiter = {
        mitraId,
        session: options?.mitraSession,
        site,
        settled: false,
        resolve: (online) => {
          if (waiter.settled) return;
          end();
          resolve(online);
        },
        reject: (error) => {
          if (waiter.settled) return;
          end();
          reject(atSite(error, site));
        },
      };
      const onAbort = () => {
        this.pending = this.pending.filter((w) => w !== waiter);
        waiter.reject(aborted(signal!));
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      if (options?.timeoutMs !== undefined) {
        const timeoutMs = options.timeoutMs;
        timer = setTimeout(() => waiter.reject(new AvailabilityError(status.DEADLINE_EXCEEDED, `no answer within ${timeoutMs} ms`)), timeoutMs);
      }
      this.pending.push(waiter);
      if (this.pending.length >= this.maxBatch) {
        this.flush();
      } else if (this.timer === undefined) {
        this.timer = setTimeout(() => this.flush(), this.windowMs);
      }
    });
  }

  /** Sends what is waiting now, without waiting for the window to close. */
  flush(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    const waiters = this.pending;
    this.pending = [];
    if (waiters.length === 0) return;
    const sent = this.send(waiters).finally(() => this.inFlight.delete(sent));
    this.inFlight.add(sent);
  }

  /** Sends what is waiting and resolves once every heartbeat sent so far has its answer. */
  async drain(): Promise<void> {
    this.flush();
    await Promise.all([...this.inFlight]);
  }

  private unary(mitraId: string, options: PresenceCallOptions | undefined): Promise<boolean> {
    this.stats.unary += 1;
    return this.sendOne(mitraId, options);
  }

  private async send(waiters: Waiter[]): Promise<void> {
    this.stats.batches += 1;
    const sessions = waiters.some((w) => w.session !== undefined) ? waiters.map((w) => w.session ?? "") : undefined;
    let results: HeartbeatResult[];
    try {
      results = await this.sendBatch(
        waiters.map((w) => w.mitraId),
        sessions,
      );
    } catch (thrown) {
      const failed = AvailabilityError.from(thrown);
      if (failed.code === status.UNIMPLEMENTED) {
        this.batchUnsupported = true;
        await Promise.all(
          waiters.map((w) => this.unary(w.mitraId, w.session === undefined ? undefined : { mitraSession: w.session }).then(w.resolve, w.reject)),
        );
        return;
      }
      // One error a waiter, as each would have got from its own call.
      for (const w of waiters) w.reject(new AvailabilityError(failed.code, failed.details, { metadata: failed.metadata, cause: failed }));
      return;
    }
    if (results.length !== waiters.length) {
      const details = `BatchHeartbeat answered ${results.length} results for ${waiters.length} ids`;
      for (const w of waiters) w.reject(new AvailabilityError(status.INTERNAL, details));
      return;
    }
    waiters.forEach((w, i) => settle(w, results[i]!));
  }
}

/** What a unary Heartbeat would have answered, with the server's own messages. */
function settle(waiter: Waiter, result: HeartbeatResult): void {
  const id = waiter.mitraId;
  const fail = (code: status, details: string) => waiter.reject(new AvailabilityError(code, details));
  switch (result.outcome) {
    case Outcome.OUTCOME_RECORDED:
    case Outcome.OUTCOME_OFFLINE:
      waiter.resolve(result.online);
      return;
    case Outcome.OUTCOME_DEACTIVATED:
      return fail(status.PERMISSION_DENIED, `mitra ${id} is deactivated`);
    case Outcome.OUTCOME_NOT_FOUND:
      return fail(status.NOT_FOUND, `mitra ${id} not found`);
    case Outcome.OUTCOME_INVALID_ID:
      return fail(status.INVALID_ARGUMENT, id ? `mitra_id: must be a UUID, got ${pythonRepr(id.slice(0, 64))}` : "mitra_id: required");
    case Outcome.OUTCOME_SESSION_REFUSED:
      return fail(status.PERMISSION_DENIED, `mitra ${id}: session refused (x-mitra-session)`);
    default:
      return fail(status.UNKNOWN, `BatchHeartbeat: unknown outcome ${result.outcome} for mitra ${id}`);
  }
}

/** A string as the server (Python's repr) quotes it in its messages. */
function pythonRepr(value: string): string {
  const quote = value.includes("'") && !value.includes('"') ? '"' : "'";
  const escaped = value
    .replace(/\\/g, "\\\\")
    .replace(/\n/g, "\\n")
    .replace(/\r/g, "\\r")
    .replace(/\t/g, "\\t");
  return quote + (quote === "'" ? escaped.replace(/'/g, "\\'") : escaped) + quote;
}
