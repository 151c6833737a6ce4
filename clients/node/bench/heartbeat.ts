/** 10,000 concurrent heartbeat() promises through `availability serve --workers 1`,
 * coalesced into BatchHeartbeat calls against one unary Heartbeat each: heartbeats a second
 * and the latency each caller saw. `npm run bench` (after `npm run build`); prints a
 * markdown table. The server runs on CPU 0 and this process on CPU 1 when taskset exists,
 * as bench/throughput.py pins the Python rows. */
import { spawnSync } from "node:child_process";
import { availableParallelism } from "node:os";

import { AvailabilityClient, type AvailabilityClientOptions, type AvailabilityError } from "@halo/availability-client";
import { Serve, Stores } from "../test/harness";

const HEARTBEATS = Number(process.env.BENCH_HEARTBEATS ?? 10_000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);

function hasTaskset(): boolean {
  return spawnSync("which", ["taskset"]).status === 0 && availableParallelism() >= 2;
}

interface Round {
  seconds: number;
  latenciesMs: number[];
  failed: Map<string, number>;
  calls: number;
}

async function round(client: AvailabilityClient, ids: string[]): Promise<Round> {
  const before = { ...client.heartbeatStats };
  const latencies: number[] = [];
  const failed = new Map<string, number>();
  const started = performance.now();
  await Promise.all(
    ids.map((id) => {
      const called = performance.now();
      return client.heartbeat(id).then(
        (online) => {
          if (!online) throw new Error(`${id} answered offline: the fleet is not online`);
          latencies.push(performance.now() - called);
        },
        (error: AvailabilityError) => failed.set(error.details, (failed.get(error.details) ?? 0) + 1),
      );
    }),
  );
  const seconds = (performance.now() - started) / 1000;
  const after = client.heartbeatStats;
  return { seconds, latenciesMs: latencies, failed, calls: after.batches - before.batches + after.unary - before.unary };
}

function percentile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}

async function main(): Promise<void> {
  if (hasTaskset() && !process.env.BENCH_PINNED) {
    const child = spawnSync("taskset", ["-c", "1", process.execPath, __filename], {
      stdio: "inherit",
      env: { ...process.env, BENCH_PINNED: "1" },
    });
    process.exit(child.status ?? 1);
  }
  const pinned = Boolean(process.env.BENCH_PINNED);
  const stores = await Stores.start();
  const serve = new Serve(stores, { HEARTBEAT_STALE_SECONDS: "3600", LOG_LEVEL: "WARNING" }, ["--workers", "1"]);
  if (pinned) serve.wrap(["taskset", "-c", "0"]);
  try {
    process.stderr.write(`[bench] ${HEARTBEATS} online mitras\n`);
    stores.migrate();
    const ids = await stores.onlineFleet(HEARTBEATS);
    await serve.start();

    const cases: Array<[string, AvailabilityClientOptions]> = [
      ["coalesced (2 ms window, ≤ 500 ids a batch)", { heartbeatWindowMs: 2, heartbeatBatch: 500 }],
      ["not coalesced, at most 256 in flight (the default maxInFlight)", { heartbeatWindowMs: 0 }],
      ["not coalesced, all at once (maxInFlight: 10,000)", { heartbeatWindowMs: 0, maxInFlight: 10_000 }],
    ];
    const clients = cases.map(([, options]) => new AvailabilityClient(serve.address, { ...options, timeoutMs: 60_000 }));
    const rounds: Round[][] = cases.map(() => []);
    process.stderr.write("[bench] warm-up\n");
    for (const client of clients) await round(client, ids);
    for (let r = 0; r < ROUNDS; r++) {
      const order = r % 2 === 0 ? cases.keys() : [...cases.keys()].reverse();
      for (const i of order) {
        const done = await round(clients[i]!, ids);
        rounds[i].push(done);
        process.stderr.write(
          `[bench] ${cases[i][0]}: round ${r + 1}: ${done.latenciesMs.length} answered in ${done.seconds.toFixed(3)} s` +
            (done.failed.size ? `, failed: ${JSON.stringify(Object.fromEntries(done.failed))}` : "") +
            "\n",
        );
      }
    }
    await Promise.all(clients.map((c) => c.close()));

    const lines = [
      `Node client, ${HEARTBEATS.toLocaleString("en")} concurrent heartbeat() promises through \`serve --workers 1\`` +
        (pinned ? " (server on CPU 0, Node on CPU 1)" : " (cores shared)") +
        `; median of ${ROUNDS} rounds by heartbeats/s (answered ones over the round's wall time); latency from each call to its answer.`,
      "",
      "| client | heartbeats/s | p50 ms | p99 ms | gRPC calls a round | failed |",
      "| --- | ---: | ---: | ---: | ---: | --- |",
    ];
    const rates: number[] = [];
    cases.forEach(([name], i) => {
      const rate = (r: Round) => r.latenciesMs.length / r.seconds;
      const sorted = [...rounds[i]].sort((a, b) => rate(b) - rate(a));
      const median = sorted[Math.floor(sorted.length / 2)];
      const latencies = [...median.latenciesMs].sort((a, b) => a - b);
      rates.push(rate(median));
      const failed = [...median.failed].map(([details, n]) => `${n.toLocaleString("en")} (${details})`).join(", ") || "0";
      lines.push(
        `| ${name} | ${Math.round(rate(median)).toLocaleString("en")} | ${percentile(latencies, 0.5).toFixed(1)} | ` +
          `${percentile(latencies, 0.99).toFixed(1)} | ${median.calls.toLocaleString("en")} | ${failed} |`,
      );
    });
    lines.push("", `Coalesced: ${(rates[0]! / rates[1]!).toFixed(1)}× the heartbeats a second of unary calls (256 in flight).`);
    console.log(lines.join("\n"));
  } finally {
    await serve.stop();
    await stores.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
