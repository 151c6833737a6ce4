import { Metadata, status } from "@grpc/grpc-js";

/** Marks every AvailabilityError, whichever copy of this package made it: the ESM and the
 * CJS builds each define the class, and an application may load both (the dual-package
 * hazard), so `instanceof` checks this registered symbol rather than the prototype chain. */
const BRAND = Symbol.for("@halo/availability-client.AvailabilityError");

export interface AvailabilityErrorOptions {
  /** Trailing metadata of the call (the server's x-request-id among them). */
  metadata?: Metadata | undefined;
  /** What caused it: the grpc-js error, the abort signal's reason, ... */
  cause?: unknown;
}

/** Every failure of this client: a status from the server or from grpc-js, an aborted or
 * timed-out call, a closed client, a refusal inside a BatchHeartbeat. `code` is a gRPC
 * status (`status.NOT_FOUND`, ...), `details` the server's message. */
export class AvailabilityError extends Error {
  override readonly name = "AvailabilityError";
  readonly code: status;
  readonly details: string;
  readonly metadata: Metadata;

  constructor(code: status, details: string, options: AvailabilityErrorOptions = {}) {
    super(`${status[code] ?? code}: ${details}`, "cause" in options ? { cause: options.cause } : undefined);
    this.code = code;
    this.details = details;
    this.metadata = options.metadata ?? new Metadata();
    Object.defineProperty(this, BRAND, { value: true });
  }

  static override [Symbol.hasInstance](value: unknown): boolean {
    return typeof value === "object" && value !== null && (value as Record<symbol, unknown>)[BRAND] === true;
  }

  /** error as an AvailabilityError: itself when it is one, a grpc-js status error with its
   * code, details and metadata, anything else (a bug in an interceptor, say) as UNKNOWN. */
  static from(error: unknown): AvailabilityError {
    if (error instanceof AvailabilityError) return error;
    const grpc = error as { code?: unknown; details?: unknown; metadata?: unknown };
    if (error instanceof Error && typeof grpc.code === "number" && typeof grpc.details === "string") {
      const metadata = grpc.metadata instanceof Metadata ? grpc.metadata : undefined;
      return new AvailabilityError(grpc.code, grpc.details, { metadata, cause: error });
    }
    return new AvailabilityError(status.UNKNOWN, error instanceof Error ? error.message : String(error), { cause: error });
  }
}

/** Where a caller made a call, kept so that an error settled later (by a batch, a timer or a
 * callback) shows the caller's frames rather than the client's internals. */
export interface CallSite {
  readonly stack?: string;
}

export function callSite(below: Function): CallSite {
  const site: { stack?: string } = {};
  Error.captureStackTrace(site, below);
  return site;
}

/** error, its stack replaced by the caller's frames (the cause keeps the original one). */
export function atSite(error: AvailabilityError, site: CallSite): AvailabilityError {
  const frames = site.stack?.slice(site.stack.indexOf("\n") + 1);
  if (frames) error.stack = `${error.name}: ${error.message}\n${frames}`;
  return error;
}
