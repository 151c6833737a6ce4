const SERVICES = ["availability.v1.AvailabilityService", "availability.v1.DashboardService"];
const STREAMS: Array<[string, string]> = [
  ["availability.v1.AvailabilityService", "WatchAvailableMitras"],
  ["availability.v1.DashboardService", "WatchDashboardStats"],
];

/** The channel's service config, as availability.client.service_config in Python but for
 * the deadline: retries of UNAVAILABLE for every unary call (each is idempotent: a state
 * set, a read or a heartbeat), none for the two streams (a watch lives as long as its caller
 * wants and resumes by itself), calls spread round-robin over every address the target
 * resolves to. One attempt: no retry policy, which gRPC requires to allow at least two. The
 * deadline is each call's own (CallOptions.timeoutMs): grpc-js takes the earlier of a
 * call's deadline and the config's timeout, so a timeout here would cap every call's. */
export function serviceConfig(attempts: number): string {
  if (!Number.isInteger(attempts) || attempts < 1) {
    throw new RangeError(`attempts must be an integer >= 1, got ${attempts}`);
  }
  const unary: Record<string, unknown> = { name: SERVICES.map((service) => ({ service })) };
  if (attempts > 1) {
    unary.retryPolicy = {
      maxAttempts: attempts,
      initialBackoff: "0.05s",
      maxBackoff: "1s",
      backoffMultiplier: 2,
      retryableStatusCodes: ["UNAVAILABLE"],
    };
  }
  const streams = { name: STREAMS.map(([service, method]) => ({ service, method })) };
  return JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }], methodConfig: [unary, streams] });
}
