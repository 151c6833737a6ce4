import { randomUUID } from "node:crypto";
import { performance } from "node:perf_hooks";

import { status } from "@grpc/grpc-js";

import type { Interceptor } from "./calls.js";
import { AvailabilityError } from "./errors.js";

/** The header the server logs each call's lines under, and answers with (availability/logs.py). */
export const REQUEST_ID_HEADER = "x-request-id";

/** Names each call with `x-request-id` unless the call already carries one: the server's log
 * lines of that call then show it (`request_id=...`). */
export function requestId(make: () => string = randomUUID): Interceptor {
  return (call, next) => {
    if (call.metadata.get(REQUEST_ID_HEADER).length === 0) call.metadata.set(REQUEST_ID_HEADER, make());
    return next();
  };
}

/** Trace context on every call: `inject` writes headers into the carrier, in the caller's
 * async context. With OpenTelemetry:
 * `traceContext((carrier) => propagation.inject(context.active(), carrier))`, which writes
 * `traceparent` (and `tracestate`); the server's log lines then carry its trace and span ids. */
export function traceContext(inject: (carrier: Record<string, string>) => void): Interceptor {
  return (call, next) => {
    const carrier: Record<string, string> = {};
    inject(carrier);
    for (const [key, value] of Object.entries(carrier)) call.metadata.set(key, value);
    return next();
  };
}

/** One unary call as it ended, for logs and metrics. */
export interface CallRecord {
  /** The gRPC path, e.g. `/availability.v1.AvailabilityService/Heartbeat`. */
  method: string;
  code: status;
  /** From the interceptor to the end: queueing under maxInFlight, retries and the call. */
  durationMs: number;
  /** x-request-id the call carried, when it did (put requestId() before observe()). */
  requestId: string | undefined;
  error: AvailabilityError | undefined;
}

/** record(...) once per unary call as it ends: a log line, a histogram, ... */
export function observe(record: (call: CallRecord) => void): Interceptor {
  return async (call, next) => {
    const started = performance.now();
    let error: AvailabilityError | undefined;
    try {
      return await next();
    } catch (thrown) {
      error = AvailabilityError.from(thrown);
      throw error;
    } finally {
      const [id] = call.metadata.get(REQUEST_ID_HEADER);
      record({
        method: call.method,
        code: error?.code ?? status.OK,
        durationMs: performance.now() - started,
        requestId: typeof id === "string" ? id : undefined,
        error,
      });
    }
  };
}
