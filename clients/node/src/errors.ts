import { Metadata, type ServiceError, status } from "@grpc/grpc-js";

/** An error shaped exactly like the ones @grpc/grpc-js rejects a call with (`code`,
 * `details`, `metadata`), for results that arrive inside a batch rather than as a call's
 * status: a caller checks `error.code === status.PERMISSION_DENIED` the same way for both. */
export function statusError(code: status, details: string, metadata = new Metadata()): ServiceError {
  const error = new Error(`${code} ${status[code]}: ${details}`) as ServiceError;
  error.code = code;
  error.details = details;
  error.metadata = metadata;
  return error;
}

/** True for an error a gRPC call ended with (rather than a bug in the caller's code). */
export function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as Partial<ServiceError>).code === "number";
}
