/** The package as another team gets it: `npm pack`, then a fresh project that installs the
 * tarball offline (from the tarball and the npm cache, by a lock made from ours), compiles a
 * consumer as ESM and as CJS (strict, exactOptionalPropertyTypes) and runs both against a
 * real `availability serve`; and `npm publish --dry-run` of the tarball. */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, posix, resolve } from "node:path";
import { after, before, test } from "node:test";

import { REPO, Serve, Stores } from "./harness";

const CLIENT = resolve(__dirname, "../..");
const TOKEN = "consumer-token";

interface Packed {
  filename: string;
  size: number;
  unpackedSize: number;
  entryCount: number;
  files: Array<{ path: string }>;
}

let stores: Stores;
let serve: Serve;
let work: string;
let packed: Packed;

function run(command: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = process.env): string {
  return execFileSync(command, args, { cwd, env, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], maxBuffer: 64 << 20 });
}

before(async () => {
  work = mkdtempSync(join(tmpdir(), "availability-node-package-"));
  [packed] = JSON.parse(run("npm", ["pack", "--json", "--pack-destination", work], CLIENT)) as [Packed];
  console.log(
    `# ${packed.filename}: ${(packed.size / 1024).toFixed(1)} kB packed, ` +
      `${(packed.unpackedSize / 1024).toFixed(1)} kB unpacked, ${packed.entryCount} files`,
  );
  stores = await Stores.start();
  serve = new Serve(stores, { AUTH_TOKENS: TOKEN });
  await serve.start({ token: TOKEN });
});

after(async () => {
  await serve?.stop();
  await stores?.close();
  if (work) rmSync(work, { recursive: true, force: true });
});

test("the tarball carries ESM, CJS, types, the sources of its maps and the package's metadata", () => {
  const files = new Set(packed.files.map((f) => f.path));
  for (const path of ["LICENSE", "README.md", "package.json", "dist/esm/index.js", "dist/esm/index.d.ts", "dist/cjs/index.js", "dist/cjs/index.d.ts", "dist/esm/package.json", "dist/cjs/package.json"]) {
    assert.ok(files.has(path), `${path} is in the tarball`);
  }
  assert.deepEqual([...files].filter((f) => /^(test|build|bench|examples|node_modules)\//.test(f)), []);
  const maps = [...files].filter((f) => f.endsWith(".map"));
  assert.ok(maps.length >= 20);
  const unpacked = join(work, "unpacked");
  run("mkdir", ["-p", unpacked], work);
  run("tar", ["-xzf", join(work, packed.filename), "-C", unpacked, "--strip-components=1"], work);
  for (const map of maps) {
    const { sources } = JSON.parse(readFileSync(join(unpacked, map), "utf8")) as { sources: string[] };
    for (const source of sources) {
      const path = posix.normalize(posix.join(posix.dirname(map), source));
      assert.ok(files.has(path), `${map} names ${source}, which the tarball carries`);
    }
  }
  const manifest = JSON.parse(readFileSync(join(unpacked, "package.json"), "utf8"));
  const pyproject = readFileSync(join(REPO, "pyproject.toml"), "utf8");
  assert.equal(manifest.version, /^version = "(.*)"$/m.exec(pyproject)![1], "the version follows the service's");
  assert.equal(manifest.private, undefined);
  assert.equal(manifest.engines.node, ">=20");
  assert.ok(manifest.license);
  assert.deepEqual(Object.keys(manifest.exports["."]), ["import", "require"]);
});

test("npm publish --dry-run accepts the tarball", () => {
  const out = run("npm", ["publish", "--dry-run", "--offline", join(work, packed.filename)], work);
  assert.match(out, /\+ @halo\/availability-client@/);
});

/** A fresh project's package.json and package-lock.json: the tarball, and its dependencies,
 * TypeScript and Node's types at exactly the versions of our lock, so that `npm ci
 * --offline` takes every one from the npm cache our own `npm ci` filled. */
function consumerProject(dir: string): void {
  const ours = JSON.parse(readFileSync(join(CLIENT, "package-lock.json"), "utf8")) as {
    packages: Record<string, { version: string; dev?: boolean; dependencies?: Record<string, string> }>;
  };
  const manifest = JSON.parse(readFileSync(join(CLIENT, "package.json"), "utf8"));
  const tarball = readFileSync(join(work, packed.filename));
  copyFileSync(join(work, packed.filename), join(dir, packed.filename));
  const tools = ["typescript", "@types/node"];
  const packages: Record<string, object> = {
    "": {
      name: "consumer",
      dependencies: { [manifest.name]: `file:${packed.filename}` },
      devDependencies: Object.fromEntries(tools.map((name) => [name, ours.packages[`node_modules/${name}`]!.version])),
    },
    [`node_modules/${manifest.name}`]: {
      version: manifest.version,
      resolved: `file:${packed.filename}`,
      integrity: `sha512-${createHash("sha512").update(tarball).digest("base64")}`,
      license: manifest.license,
      dependencies: manifest.dependencies,
      engines: manifest.engines,
    },
  };
  for (const [path, entry] of Object.entries(ours.packages)) {
    if (path && (!entry.dev || tools.some((name) => path === `node_modules/${name}`))) packages[path] = { ...entry, dev: undefined };
  }
  const { "": root } = packages as { "": object };
  writeFileSync(join(dir, "package.json"), JSON.stringify({ ...root, private: true }, null, 2));
  writeFileSync(join(dir, "package-lock.json"), JSON.stringify({ name: "consumer", lockfileVersion: 3, requires: true, packages }, null, 2));
  writeFileSync(
    join(dir, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: {
        target: "ES2022",
        module: "nodenext",
        moduleResolution: "nodenext",
        strict: true,
        exactOptionalPropertyTypes: true,
        types: ["node"],
      },
      files: ["consumer.mts", "consumer.cts"],
    }),
  );
  const consumer = readFileSync(join(CLIENT, "test/consumer/consumer.ts"), "utf8");
  writeFileSync(join(dir, "consumer.mts"), consumer);
  writeFileSync(join(dir, "consumer.cts"), consumer);
}

test("a fresh project installs the tarball offline, compiles as ESM and CJS and calls every method", async () => {
  const dir = join(work, "consumer");
  run("mkdir", ["-p", dir], work);
  consumerProject(dir);
  run("npm", ["ci", "--offline", "--no-audit", "--no-fund", "--ignore-scripts"], dir);
  run(join(dir, "node_modules/.bin/tsc"), ["-p", "."], dir);

  for (const [file, format] of [["consumer.mjs", "esm"], ["consumer.cjs", "cjs"]] as const) {
    const [ayu, budi] = await stores.mitras(2, `Consumer ${format}`);
    await stores.authSession(budi!);
    const env = { ...process.env, AVAILABILITY_TOKEN: TOKEN };
    const result = JSON.parse(run(process.execPath, [file, serve.address, ayu!, budi!], dir, env));
    const refusedEverywhere = { esm: true, cjs: true };
    assert.deepEqual(result, {
      loaded: format,
      health: "SERVING",
      online: true,
      beat: true,
      batched: true,
      loads: { [ayu!]: 0 },
      current: [0, "cache"],
      reachable: true,
      found: [ayu],
      available: 1,
      activeChats: 0,
      watched: 1,
      liveIds: [ayu],
      deactivated: true,
      revokedAuthSessions: 1,
      offline: true,
      notFound: { code: "NOT_FOUND", ...refusedEverywhere },
      refused: { code: "PERMISSION_DENIED", ...refusedEverywhere },
      closed: { code: "CANCELLED", ...refusedEverywhere },
      otherBuildsError: true,
      records: [
        "Check OK id",
        "SetOnline OK id",
        "BatchHeartbeat OK id",
        "BatchHeartbeat OK id",
        "RecomputeLoad OK id",
        "GetMitraStatus OK id",
        "IsMitraReachable OK id",
        "FindAvailableMitras OK id",
        "CountAvailableMitras OK id",
        "GetDashboardStats OK id",
        "SetMitraActive OK id",
        "SetOffline OK id",
        "GetMitraStatus NOT_FOUND id",
        "BatchHeartbeat OK id",
        "CountAvailableMitras CANCELLED id",
      ],
    });
  }
});
