import { type ServiceError, status } from "@grpc/grpc-js";

import { isServiceError, statusError } from "./errors";
import { type HeartbeatResult, HeartbeatResult_Outcome as Outcome } from "./gen/availability/v1/availability";

/** The most ids one BatchHeartbeat may carry (the server refuses more). */
export const MAX_BATCH = 5_000;

export interface HeartbeatStats {
  /** heartbeat() calls made */
  heartbeats: number;
  /** BatchHeartbeat calls sent */
  batches: number;
  /** unary Heartbeat calls sent (window off, or a server without BatchHeartbeat) */
  unary: number;
}

interface Waiter {
  mitraId: string;
  resolve(online: boolean): void;
  reject(error: ServiceError): void;
}

type SendBatch = (mitraIds: string[]) => Promise<HeartbeatResult[]>;
type SendOne = (mitraId: string) => Promise<boolean>;

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

  heartbeat(mitraId: string): Promise<boolean> {
    this.stats.heartbeats += 1;
    if (this.windowMs === 0 || this.batchUnsupported) return this.unary(mitraId);
    return new Promise<boolean>((resolve, reject) => {
      this.pending.push({ mitraId, resolve, reject });
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

  private unary(mitraId: string): Promise<boolean> {
    this.stats.unary += 1;
    return this.sendOne(mitraId);
  }

  private async send(waiters: Waiter[]): Promise<void> {
    this.stats.batches += 1;
    let results: HeartbeatResult[];
    try {
      results = await this.sendBatch(waiters.map((w) => w.mitraId));
    } catch (error) {
      if (!isServiceError(error)) {
        for (const w of waiters) w.reject(error as ServiceError); // e.g. the client was closed
        return;
      }
      const failed = error;
      if (failed.code === status.UNIMPLEMENTED) {
        this.batchUnsupported = true;
        await Promise.all(waiters.map((w) => this.unary(w.mitraId).then(w.resolve, w.reject)));
        return;
      }
      // One error a waiter, as each would have got from its own call.
      for (const w of waiters) w.reject(statusError(failed.code, failed.details, failed.metadata));
      return;
    }
    if (results.length !== waiters.length) {
      const error = statusError(
        status.INTERNAL,
        `BatchHeartbeat answered ${results.length} results for ${waiters.length} ids`,
      );
      for (const w of waiters) w.reject(error);
      return;
    }
    waiters.forEach((w, i) => settle(w, results[i]));
  }
}

/** What a unary Heartbeat would have answered, with the server's own messages. */
function settle(waiter: Waiter, result: HeartbeatResult): void {
  const id = waiter.mitraId;
  switch (result.outcome) {
    case Outcome.OUTCOME_RECORDED:
    case Outcome.OUTCOME_OFFLINE:
      waiter.resolve(result.online);
      return;
    case Outcome.OUTCOME_DEACTIVATED:
      waiter.reject(statusError(status.PERMISSION_DENIED, `mitra ${id} is deactivated`));
      return;
    case Outcome.OUTCOME_NOT_FOUND:
      waiter.reject(statusError(status.NOT_FOUND, `mitra ${id} not found`));
      return;
    case Outcome.OUTCOME_INVALID_ID:
      waiter.reject(
        statusError(status.INVALID_ARGUMENT, id ? `mitra_id: must be a UUID, got ${pythonRepr(id.slice(0, 64))}` : "mitra_id: required"),
      );
      return;
    default:
      waiter.reject(statusError(status.UNKNOWN, `BatchHeartbeat: unknown outcome ${result.outcome} for mitra ${id}`));
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
