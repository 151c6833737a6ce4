/** Real stores and a real `availability serve` for the tests and the bench, as
 * tests/conftest.py arranges them for the Python suite:
 *
 * - Postgres: TEST_DATABASE_URL, else the shared one on 127.0.0.1:5432 (database `test`)
 *   when it answers, else a throwaway one from the repo's local_stores; in it a database of
 *   this run's own, migrated by the server and dropped at the end.
 * - Valkey: a throwaway redis-server (or valkey-server) on a free port, never the shared
 *   one, so stopping servers and leftover keys cannot touch anyone else's run.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import net, { type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

import pg from "pg";

import { AvailabilityClient, type AvailabilityClientOptions } from "@halo/availability-client";

export const REPO = resolve(__dirname, "../../../..");
export const VENV_BIN = process.env.AVAILABILITY_VENV_BIN ?? join(REPO, ".venv/bin");

/** Every process started here, stopped if this one ends first (a test timed out, Ctrl-C). */
const children = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => process.exit(128 + (signal === "SIGINT" ? 2 : 15)));
}

function started(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

export function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = net.createServer();
    server.on("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as AddressInfo;
      server.close(() => done(port));
    });
  });
}

function answers(port: number): Promise<boolean> {
  return new Promise((done) => {
    const socket = net.connect({ host: "127.0.0.1", port, timeout: 500 });
    socket.on("connect", () => (socket.destroy(), done(true)));
    socket.on("error", () => done(false));
    socket.on("timeout", () => (socket.destroy(), done(false)));
  });
}

/** Polls check until it returns a truthy value; throws with its last value otherwise. */
export async function eventually<T>(check: () => Promise<T> | T, timeoutMs = 20_000, what = "condition"): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what} not met within ${timeoutMs} ms (last value ${String(value)})`);
    await sleep(20);
  }
}

function exited(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((done) => {
    const timer = setTimeout(() => done(false), timeoutMs);
    child.once("exit", () => (clearTimeout(timer), done(true)));
  });
}

async function stopProcess(child: ChildProcess, timeoutMs = 15_000): Promise<void> {
  child.kill("SIGTERM");
  if (!(await exited(child, timeoutMs))) {
    child.kill("SIGKILL");
    await exited(child, 5_000);
  }
}

/** A database of this run's own and a throwaway Valkey. */
export class Stores {
  readonly dir = mkdtempSync(join(tmpdir(), "availability-node-"));
  databaseUrl = "";
  valkeyUrl = "";
  private adminDsn = "";
  private database = "";
  private valkey: ChildProcess | undefined;
  private postgres: ChildProcess | undefined;

  static async start(): Promise<Stores> {
    const stores = new Stores();
    try {
      await stores.startPostgres();
      await stores.startValkey();
    } catch (error) {
      await stores.close();
      throw error;
    }
    return stores;
  }

  private async startPostgres(): Promise<void> {
    if (process.env.TEST_DATABASE_URL) {
      this.adminDsn = process.env.TEST_DATABASE_URL;
    } else if (await answers(5432)) {
      this.adminDsn = "postgresql://postgres@127.0.0.1:5432/test";
    } else {
      this.adminDsn = await this.throwawayPostgres();
    }
    this.database = `availability_test_node_${process.pid}_${randomBytes(3).toString("hex")}`;
    const admin = new pg.Client({ connectionString: this.adminDsn });
    await admin.connect();
    try {
      await admin.query(`CREATE DATABASE "${this.database}"`);
    } finally {
      await admin.end();
    }
    this.databaseUrl = `${this.adminDsn.slice(0, this.adminDsn.lastIndexOf("/"))}/${this.database}`;
  }

  /** The repo's embedded Postgres, as conftest starts it when none answers. */
  private throwawayPostgres(): Promise<string> {
    const script =
      "import sys; from pathlib import Path; from availability import local_stores\n" +
      "pg = local_stores.start_postgres(Path(sys.argv[1]))\n" +
      "print(pg.dsn, flush=True); sys.stdin.read(); pg.stop()";
    const child = started(
      spawn(join(VENV_BIN, "python"), ["-c", script, join(this.dir, "postgres")], { stdio: ["pipe", "pipe", "inherit"] }),
    );
    this.postgres = child;
    return new Promise((done, fail) => {
      let out = "";
      child.stdout!.on("data", (chunk: Buffer) => {
        out += chunk.toString();
        if (out.includes("\n")) done(out.trim());
      });
      child.once("exit", (code) => fail(new Error(`throwaway Postgres exited with ${code}`)));
    });
  }

  private async startValkey(): Promise<void> {
    const binary = ["valkey-server", "redis-server"].find((name) => {
      try {
        execFileSync("which", [name], { stdio: "ignore" });
        return true;
      } catch {
        return false;
      }
    });
    if (!binary) throw new Error("neither valkey-server nor redis-server is on PATH");
    const port = await freePort();
    const log = openSync(join(this.dir, "valkey.log"), "a");
    this.valkey = started(
      spawn(binary, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", this.dir], {
        stdio: ["ignore", log, log],
      }),
    );
    closeSync(log);
    await eventually(() => answers(port), 10_000, `${binary} on port ${port}`);
    this.valkeyUrl = `redis://127.0.0.1:${port}/0`;
  }

  /** One command to the throwaway Valkey (e.g. FLUSHALL, as a Valkey that lost its data). */
  valkeyCommand(...args: string[]): Promise<string> {
    const { port } = new URL(this.valkeyUrl);
    return new Promise((done, fail) => {
      const socket = net.connect({ host: "127.0.0.1", port: Number(port) });
      let reply = "";
      socket.on("connect", () =>
        socket.write(`*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join("")}`),
      );
      socket.on("data", (chunk) => {
        reply += chunk.toString();
        if (reply.endsWith("\r\n")) (socket.end(), done(reply.trim()));
      });
      socket.on("error", fail);
    });
  }

  /** The schema, before any server runs (to load a fleet it then seeds from). */
  migrate(): void {
    execFileSync(join(VENV_BIN, "availability"), ["migrate"], {
      env: { ...process.env, DATABASE_URL: this.databaseUrl, VALKEY_URL: this.valkeyUrl, LOG_LEVEL: "WARNING" },
      stdio: "ignore",
    });
  }

  /** count online mitras with a fresh heartbeat, inserted in SQL as a fleet already running. */
  async onlineFleet(count: number): Promise<string[]> {
    await this.sql(
      "INSERT INTO mitras (display_name, max_concurrent_sessions) SELECT 'Mitra ' || g, 3 FROM generate_series(1, $1) g",
      [count],
    );
    await this.sql(
      "INSERT INTO mitra_online_status (mitra_id, is_online, last_heartbeat_at) SELECT id, true, now() FROM mitras",
    );
    return (await this.sql<{ id: string }>("SELECT id FROM mitras ORDER BY id")).map((r) => r.id);
  }

  /** SQL as the other backends run it: arranging mitras, sessions and auth sessions. */
  async sql<T extends pg.QueryResultRow = pg.QueryResultRow>(text: string, values: unknown[] = []): Promise<T[]> {
    const client = new pg.Client({ connectionString: this.databaseUrl });
    await client.connect();
    try {
      return (await client.query<T>(text, values)).rows;
    } finally {
      await client.end();
    }
  }

  /** A mitra as the admin backend inserts it; returns its id. */
  async mitra(name: string, options: { active?: boolean; capacity?: number } = {}): Promise<string> {
    const [row] = await this.sql<{ id: string }>(
      "INSERT INTO mitras (display_name, is_active, max_concurrent_sessions) VALUES ($1, $2, $3) RETURNING id",
      [name, options.active ?? true, options.capacity ?? 3],
    );
    return row.id;
  }

  /** count mitras named "<name> <i>"; returns their ids in that order. */
  async mitras(count: number, name: string, options: { active?: boolean; capacity?: number } = {}): Promise<string[]> {
    const ids: string[] = [];
    for (let i = 0; i < count; i++) ids.push(await this.mitra(`${name} ${i}`, options));
    return ids;
  }

  /** A chat session as the chat backend inserts it; returns its id. */
  async session(mitraId: string, status = "active"): Promise<string> {
    const [row] = await this.sql<{ id: string }>(
      "INSERT INTO chat_sessions (mitra_id, customer_id, status, topic_sensitivity)" +
        " VALUES ($1, gen_random_uuid(), $2, 'normal') RETURNING id",
      [mitraId, status],
    );
    return row.id;
  }

  /** A live auth session of this mitra (its app logged in); its id. */
  async authSession(mitraId: string): Promise<string> {
    const [row] = await this.sql<{ id: string }>(
      "INSERT INTO auth_sessions (mitra_id, expires_at) VALUES ($1, now() + interval '1 hour') RETURNING id",
      [mitraId],
    );
    return row.id;
  }

  async close(): Promise<void> {
    if (this.valkey) await stopProcess(this.valkey);
    if (this.database) {
      const admin = new pg.Client({ connectionString: this.adminDsn });
      await admin.connect();
      try {
        await admin.query(`DROP DATABASE IF EXISTS "${this.database}" WITH (FORCE)`);
      } finally {
        await admin.end();
      }
    }
    if (this.postgres) {
      this.postgres.stdin!.end();
      await exited(this.postgres, 30_000);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** `availability serve` on a free port of its own, on these stores. */
export class Serve {
  port = 0;
  metricsPort = 0;
  private child: ChildProcess | undefined;
  private wrapper: string[] = [];
  readonly logPath: string;
  readonly prefix = `test-node-${randomBytes(6).toString("hex")}`;

  constructor(
    readonly stores: Stores,
    private readonly env: Record<string, string> = {},
    private readonly args: string[] = [],
  ) {
    this.logPath = join(stores.dir, `serve-${this.prefix}.log`);
  }

  /** Runs the server under this command (e.g. taskset -c 0). */
  wrap(command: string[]): void {
    this.wrapper = command;
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** Starts it (again, on the same ports) and waits until it is SERVING. */
  async start(client: AvailabilityClientOptions = {}): Promise<void> {
    if (!this.port) [this.port, this.metricsPort] = [await freePort(), await freePort()];
    const log = openSync(this.logPath, "a");
    const [command, ...args] = [...this.wrapper, join(VENV_BIN, "availability"), "serve", ...this.args];
    this.child = started(spawn(command, args, {
      stdio: ["ignore", log, log],
      env: {
        ...process.env,
        DATABASE_URL: this.stores.databaseUrl,
        VALKEY_URL: this.stores.valkeyUrl,
        VALKEY_KEY_PREFIX: this.prefix,
        GRPC_ADDRESS: this.address,
        METRICS_ADDRESS: `127.0.0.1:${this.metricsPort}`,
        LOG_FORMAT: "text",
        ...this.env,
      },
    }));
    closeSync(log);
    const child = this.child;
    const probe = new AvailabilityClient(this.address, { ...client, timeoutMs: 1_000, attempts: 1 });
    try {
      await eventually(
        async () => {
          if (child.exitCode !== null) throw new Error(`availability serve exited with ${child.exitCode}:\n${this.logTail()}`);
          return (await probe.health().catch(() => "")) === "SERVING";
        },
        60_000,
        `availability serve SERVING on ${this.address}`,
      );
    } finally {
      await probe.close();
    }
  }

  async stop(): Promise<void> {
    if (this.child) await stopProcess(this.child, 30_000);
    this.child = undefined;
  }

  logTail(lines = 40): string {
    return readFileSync(this.logPath, "utf8").split("\n").slice(-lines).join("\n");
  }

  /** Completed calls of one method, as the server's own metrics count them. */
  async handled(method: string, code = "OK"): Promise<number> {
    const text = await (await fetch(`http://127.0.0.1:${this.metricsPort}/metrics`)).text();
    let total = 0;
    for (const line of text.split("\n")) {
      if (
        line.startsWith("grpc_server_handled_total{") &&
        line.includes(`grpc_method="${method}"`) &&
        line.includes(`grpc_code="${code}"`)
      ) {
        total += Number(line.slice(line.lastIndexOf(" ") + 1));
      }
    }
    return total;
  }
}
