/** The service's values as this client returns them: the names of the API reference
 * (docs/api/reference.md) in camelCase, enums as lower-case words (as availability.model in
 * Python), times as Date. */

/** Which store answered a read. */
export type Source = "cache" | "database";

export interface MitraStatus {
  mitraId: string;
  displayName: string;
  /** mitra_online_status.is_online */
  online: boolean;
  /** not deactivated */
  active: boolean;
  /** last heartbeat within HEARTBEAT_STALE_SECONDS */
  fresh: boolean;
  /** online, active and fresh */
  reachable: boolean;
  /** reachable and load < maxConcurrentSessions */
  available: boolean;
  /** chat sessions in active or pending_payment */
  load: number;
  maxConcurrentSessions: number;
  /** null when the mitra never sent one (or is offline in the cache) */
  lastHeartbeatAt: Date | null;
  source: Source;
}

export interface AvailableMitra {
  mitraId: string;
  displayName: string;
  load: number;
  maxConcurrentSessions: number;
}

/** The beacon. */
export interface AvailabilityCount {
  available: number;
  online: number;
  /** when the counts were computed (at most BEACON_TTL_SECONDS ago) */
  asOf: Date;
  source: Source;
}

export interface MitraSessionCount {
  mitraId: string;
  displayName: string;
  /** sessions in active or pending_payment */
  activeSessionCount: number;
}

export interface SensitiveStats {
  total: number;
  last30dTotal: number;
  last30dSensitive: number;
  /** last30dSensitive / last30dTotal in percent, one decimal; 0 without sessions */
  last30dPercent: number;
}

export interface DashboardStats {
  /** sessions in active or pending_payment */
  activeChats: number;
  onlineMitras: number;
  /** sessions in searching or pending_acceptance */
  pendingRequests: number;
  /** online mitras, busiest first */
  customersPerMitra: MitraSessionCount[];
  sensitive: SensitiveStats;
  asOf: Date;
  /** which store answered onlineMitras and customersPerMitra */
  source: Source;
}

export type ChangeKind = "available" | "unavailable" | "load_changed";

export type UnavailableReason = "offline" | "stale" | "deactivated" | "full" | "removed";

/** Every available mitra at this revision, least loaded first; replaces the live set. */
export interface AvailabilitySnapshot {
  type: "snapshot";
  revision: number;
  mitras: AvailableMitra[];
}

/** One mitra became available, unavailable (with the reason), or changed its load. */
export interface AvailabilityChange {
  type: "change";
  revision: number;
  kind: ChangeKind;
  /** as it is now (for "unavailable": as it was last known) */
  mitra: AvailableMitra;
  /** set when kind is "unavailable" */
  reason: UnavailableReason | null;
}

export type AvailabilityEvent = AvailabilitySnapshot | AvailabilityChange;
