import { EventEmitter } from "node:events";

import { type ClientReadableStream, type Metadata, status, type StatusObject } from "@grpc/grpc-js";

import { AvailabilityError } from "./errors.js";
import {
  type AvailabilityServiceClient,
  type AvailableMitra as AvailableMitraMessage,
  ChangeKind,
  UnavailableReason,
  type WatchAvailableMitrasResponse,
} from "./gen/availability/v1/availability.js";
import type { AvailabilityChange, AvailabilityEvent, AvailabilitySnapshot, AvailableMitra } from "./model.js";

/** Initial metadata of a watch: the revision it is live from (a resume replays up to it). */
export const REVISION_HEADER = "availability-revision";

/** Worth resuming a watch after: the server or its Valkey went away, or the stream was cut. */
const RESUMABLE = new Set<number>([
  status.OK,
  status.UNAVAILABLE,
  status.RESOURCE_EXHAUSTED,
  status.CANCELLED,
  status.INTERNAL,
  status.UNKNOWN,
]);

const INITIAL_BACKOFF_MS = 50;

export interface LiveOptions {
  /** Longest pause between two reconnects (the pause doubles from 50 ms, with jitter). */
  maxBackoffMs?: number | undefined;
  /** Headers of the stream, added to the client's. */
  metadata?: Metadata | Readonly<Record<string, string>> | undefined;
}

export interface LiveAvailabilityEvents {
  snapshot: [AvailabilitySnapshot];
  change: [AvailabilityChange];
  /** in sync, or no longer */
  sync: [boolean];
  /** the stream ended; it is opened again after delayMs */
  reconnect: [{ code: number; details: string; delayMs: number }];
  /** ended for good by an error not worth resuming after (e.g. UNAUTHENTICATED); emitted
   * only while someone listens (the error is kept in `failure` either way) */
  error: [AvailabilityError];
  /** closed by close() */
  close: [];
}

/** Available mitras, kept current by WatchAvailableMitras, as LiveAvailability in Python:
 * first a snapshot, then one change at a time, resumed by revision after any interruption
 * (a fresh snapshot when the server no longer has the changes missed).
 *
 * inSync is false until the first snapshot and while reconnecting; a caller that must not
 * act on a possibly old set asks findAvailableMitras meanwhile. Listen to "snapshot" and
 * "change", or iterate it (`for await`), to see each event once applied. */
export class LiveAvailability extends EventEmitter<LiveAvailabilityEvents> {
  /** The last revision applied: where a reconnect resumes from. */
  revision = 0;
  /** How many times the stream ended and was opened again. */
  reconnects = 0;
  /** Why the watch stopped for good, when it did. */
  failure: AvailabilityError | undefined;
  private current = new Map<string, AvailableMitra>();
  private synced = false;
  private closed = false;
  private call: ClientReadableStream<WatchAvailableMitrasResponse> | undefined;
  private retry: NodeJS.Timeout | undefined;
  private readonly maxBackoffMs: number;
  private backoffMs = INITIAL_BACKOFF_MS;

  constructor(
    private readonly stub: AvailabilityServiceClient,
    private readonly metadata: () => Metadata,
    options: LiveOptions = {},
  ) {
    super();
    this.maxBackoffMs = options.maxBackoffMs ?? 2_000;
    this.connect();
  }

  get inSync(): boolean {
    return this.synced;
  }

  get mitras(): ReadonlyMap<string, AvailableMitra> {
    return this.current;
  }

  /** The limit least loaded available mitras not in exclude, as FindAvailableMitras
   * orders them from this set: load, then id. */
  leastLoaded(limit: number, exclude: Iterable<string> = []): AvailableMitra[] {
    const skip = new Set(exclude);
    return [...this.current.values()]
      .filter((m) => !skip.has(m.mitraId))
      .sort((a, b) => a.load - b.load || (a.mitraId < b.mitraId ? -1 : a.mitraId > b.mitraId ? 1 : 0))
      .slice(0, limit);
  }

  /** Resolves when the set is current (the first snapshot, or a resumed stream caught up);
   * rejects when the watch stops for good, or after timeoutMs when given. */
  waitInSync(timeoutMs?: number): Promise<void> {
    if (this.synced) return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<void>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const done = (error?: AvailabilityError) => {
        clearTimeout(timer);
        this.off("sync", onSync);
        this.off("error", done);
        if (error) reject(error);
        else resolve();
      };
      const onSync = (inSync: boolean) => {
        if (inSync) done();
      };
      this.on("sync", onSync);
      this.on("error", done);
      if (timeoutMs !== undefined) {
        timer = setTimeout(
          () => done(new AvailabilityError(status.DEADLINE_EXCEEDED, `not in sync within ${timeoutMs} ms`)),
          timeoutMs,
        );
      }
    });
  }

  /** Stops following; the set keeps its last content. */
  close(): void {
    this.closed = true;
    clearTimeout(this.retry);
    this.call?.cancel();
    this.setInSync(false);
    this.emit("close");
  }

  /** Each snapshot and change, once applied; ends when closed, throws when the watch fails. */
  async *[Symbol.asyncIterator](): AsyncGenerator<AvailabilityEvent> {
    const queue: AvailabilityEvent[] = [];
    let wake: (() => void) | undefined;
    let failed: AvailabilityError | undefined;
    let ended = this.closed;
    const push = (event: AvailabilityEvent) => {
      queue.push(event);
      wake?.();
    };
    const fail = (error: AvailabilityError) => {
      failed = error;
      wake?.();
    };
    const end = () => {
      ended = true;
      wake?.();
    };
    this.on("snapshot", push);
    this.on("change", push);
    this.on("error", fail);
    this.on("close", end);
    try {
      for (;;) {
        while (queue.length > 0) yield queue.shift() as AvailabilityEvent;
        if (failed) throw failed;
        if (ended || this.failure) return;
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
      }
    } finally {
      this.off("snapshot", push);
      this.off("change", push);
      this.off("error", fail);
      this.off("close", end);
    }
  }

  private stop(failure: AvailabilityError): void {
    this.failure = failure;
    this.setInSync(false);
    if (this.listenerCount("error") > 0) this.emit("error", failure);
  }

  private setInSync(value: boolean): void {
    if (value === this.synced) return;
    this.synced = value;
    this.emit("sync", value);
  }

  private connect(): void {
    if (this.closed) return;
    const request = this.revision ? { resumeRevision: this.revision } : {};
    let call: ClientReadableStream<WatchAvailableMitrasResponse>;
    try {
      call = this.stub.watchAvailableMitras(request, this.metadata());
    } catch (error) {
      // The channel was closed under the watch (its client closed): nothing left to resume on.
      this.stop(new AvailabilityError(status.CANCELLED, "watch stopped: the client was closed", { cause: error }));
      return;
    }
    this.call = call;
    // Unknown until the headers name it: never in sync on a stream that did not say.
    let liveFrom = Number.POSITIVE_INFINITY;
    let parts: AvailableMitraMessage[] = [];
    call.on("metadata", (headers: Metadata) => {
      // A resumed stream replays the missed changes (or sends a snapshot) up to the
      // server's revision at its start: in sync once that is reached. Headers without it
      // (a refusal relayed by a proxy) prove nothing about the old set.
      const header = headers.get(REVISION_HEADER)[0];
      if (header === undefined) return;
      liveFrom = Number(header);
      this.setInSync(this.revision > 0 && this.revision >= liveFrom);
    });
    call.on("data", (message: WatchAvailableMitrasResponse) => {
      this.backoffMs = INITIAL_BACKOFF_MS;
      if (message.snapshot) {
        parts.push(...message.snapshot.mitras);
        if (message.snapshot.part + 1 < message.snapshot.parts) return;
        const snapshot: AvailabilitySnapshot = {
          type: "snapshot",
          revision: message.revision,
          mitras: parts.map(available),
        };
        parts = [];
        this.current = new Map(snapshot.mitras.map((m) => [m.mitraId, m]));
        this.revision = snapshot.revision;
        this.setInSync(true);
        this.emit("snapshot", snapshot);
      } else if (message.change) {
        const change = toChange(message);
        if (change.kind === "unavailable") this.current.delete(change.mitra.mitraId);
        else this.current.set(change.mitra.mitraId, change.mitra);
        this.revision = change.revision;
        if (this.revision >= liveFrom) this.setInSync(true);
        this.emit("change", change);
      }
    });
    call.on("error", () => {}); // the status below says it all
    call.on("status", (ended: StatusObject) => this.ended(call, ended));
  }

  private ended(call: ClientReadableStream<WatchAvailableMitrasResponse>, ended: StatusObject): void {
    if (call !== this.call || this.closed) return;
    this.call = undefined;
    this.setInSync(false);
    if (!RESUMABLE.has(ended.code)) {
      this.stop(new AvailabilityError(ended.code, ended.details, { metadata: ended.metadata }));
      return;
    }
    // Equal jitter: many watchers cut at once (a server restart) do not come back at once.
    const delayMs = this.backoffMs / 2 + Math.random() * (this.backoffMs / 2);
    this.backoffMs = Math.min(this.backoffMs * 2, this.maxBackoffMs);
    this.reconnects += 1;
    this.emit("reconnect", { code: ended.code, details: ended.details, delayMs });
    this.retry = setTimeout(() => this.connect(), delayMs);
  }
}

const KINDS: Partial<Record<ChangeKind, AvailabilityChange["kind"]>> = {
  [ChangeKind.CHANGE_KIND_AVAILABLE]: "available",
  [ChangeKind.CHANGE_KIND_UNAVAILABLE]: "unavailable",
  [ChangeKind.CHANGE_KIND_LOAD_CHANGED]: "load_changed",
};

const REASONS: Partial<Record<UnavailableReason, NonNullable<AvailabilityChange["reason"]>>> = {
  [UnavailableReason.UNAVAILABLE_REASON_OFFLINE]: "offline",
  [UnavailableReason.UNAVAILABLE_REASON_STALE]: "stale",
  [UnavailableReason.UNAVAILABLE_REASON_DEACTIVATED]: "deactivated",
  [UnavailableReason.UNAVAILABLE_REASON_FULL]: "full",
  [UnavailableReason.UNAVAILABLE_REASON_REMOVED]: "removed",
};

export function available(m: AvailableMitraMessage): AvailableMitra {
  return {
    mitraId: m.mitraId,
    displayName: m.displayName,
    load: m.load,
    maxConcurrentSessions: m.maxConcurrentSessions,
  };
}

function toChange(message: WatchAvailableMitrasResponse): AvailabilityChange {
  const change = message.change!;
  return {
    type: "change",
    revision: message.revision,
    // A kind this version does not know yet: treat it as a load change (still available).
    kind: KINDS[change.kind] ?? "load_changed",
    mitra: available(change.mitra!),
    reason: REASONS[change.reason] ?? null,
  };
}
