export { status, Metadata, type ServiceError } from "@grpc/grpc-js";

export { AvailabilityClient, type AvailabilityClientOptions, type TlsOptions, type WatchDashboardOptions } from "./client";
export { isServiceError, statusError } from "./errors";
export { type HeartbeatResult, HeartbeatResult_Outcome as HeartbeatOutcome } from "./gen/availability/v1/availability";
export { MAX_BATCH, type HeartbeatStats } from "./heartbeats";
export { LiveAvailability, type LiveAvailabilityEvents, type LiveOptions, REVISION_HEADER } from "./live";
export type * from "./model";
export { serviceConfig } from "./serviceConfig";
