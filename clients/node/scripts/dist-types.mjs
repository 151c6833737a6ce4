// dist/esm holds ES modules, dist/cjs CommonJS: each folder says so to Node and TypeScript.
import { writeFileSync } from "node:fs";

writeFileSync("dist/esm/package.json", '{ "type": "module" }\n');
writeFileSync("dist/cjs/package.json", '{ "type": "commonjs" }\n');
