export { status, Metadata } from "@grpc/grpc-js";

export { type Call, type CallOptions, type Interceptor, MITRA_SESSION_HEADER, type PresenceCallOptions } from "./calls.js";
export {
  AvailabilityClient,
  type AvailabilityClientOptions,
  type BatchHeartbeatOptions,
  type TlsOptions,
  type WatchDashboardOptions,
} from "./client.js";
export { AvailabilityError, type AvailabilityErrorOptions } from "./errors.js";
export { type HeartbeatResult, HeartbeatResult_Outcome as HeartbeatOutcome } from "./gen/availability/v1/availability.js";
export { MAX_BATCH, type HeartbeatStats } from "./heartbeats.js";
export { type CallRecord, observe, REQUEST_ID_HEADER, requestId, traceContext } from "./interceptors.js";
export { LiveAvailability, type LiveAvailabilityEvents, type LiveOptions, REVISION_HEADER } from "./live.js";
export type * from "./model.js";
export { serviceConfig } from "./serviceConfig.js";
