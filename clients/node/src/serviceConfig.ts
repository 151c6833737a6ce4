const SERVICES = ["availability.v1.AvailabilityService", "availability.v1.DashboardService"];
const STREAMS: Array<[string, string]> = [
  ["availability.v1.AvailabilityService", "WatchAvailableMitras"],
  ["availability.v1.DashboardService", "WatchDashboardStats"],
];

/** A duration as the service config spells it. grpc-js reads the digits after the point as
 * nanoseconds whatever their number ("2.5s" would be 2 s and 5 ns), so always nine. */
function duration(ms: number): string {
  const nanos = Math.round(ms * 1e6);
  const seconds = Math.floor(nanos / 1e9);
  return `${seconds}.${String(nanos % 1e9).padStart(9, "0")}s`;
}

/** The channel's service config, as availability.client.service_config in Python: a
 * deadline and retries of UNAVAILABLE for every unary call (each is idempotent: a state set,
 * a read or a heartbeat), none for the two streams (a watch lives as long as its caller
 * wants and resumes by itself), calls spread round-robin over every address the target
 * resolves to. One attempt: no retry policy, which gRPC requires to allow at least two. */
export function serviceConfig(timeoutMs: number, attempts: number): string {
  if (!(timeoutMs > 0)) throw new RangeError(`timeoutMs must be > 0, got ${timeoutMs}`);
  if (!Number.isInteger(attempts) || attempts < 1) {
    throw new RangeError(`attempts must be an integer >= 1, got ${attempts}`);
  }
  const unary: Record<string, unknown> = {
    name: SERVICES.map((service) => ({ service })),
    timeout: duration(timeoutMs),
  };
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
