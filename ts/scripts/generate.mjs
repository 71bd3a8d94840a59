// Regenerates src/generated/openapi.ts from the committed OpenAPI document,
// or with --check verifies that the committed file is what the generator
// would write today (generating into a temporary directory and comparing).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const spec = join(root, "..", "api", "openapi.json");
const target = join(root, "src", "generated", "openapi.ts");
const cli = join(root, "node_modules", "openapi-typescript", "bin", "cli.js");

function generate(output, quiet) {
  execFileSync(
    process.execPath,
    // Defaults in the document are what the server fills in, not fields the
    // caller must send: without this flag every defaulted request property
    // (memory, timeout, shell, ...) would become required.
    [cli, spec, "--default-non-nullable", "false", "--output", output],
    { stdio: ["ignore", quiet ? "ignore" : "inherit", "inherit"] },
  );
}

if (process.argv.includes("--check")) {
  const dir = mkdtempSync(join(tmpdir(), "smolvm-openapi-"));
  try {
    const fresh = join(dir, "openapi.ts");
    generate(fresh, true);
    let committed = "";
    try {
      committed = readFileSync(target, "utf8");
    } catch {
      // A missing file is stale too; reported below.
    }
    if (readFileSync(fresh, "utf8") !== committed) {
      console.error(
        `${relative(root, target)} is stale against ${relative(root, spec)}; run \`npm run generate\` and commit the result.`,
      );
      process.exit(1);
    }
    console.log(`${relative(root, target)} is up to date with ${relative(root, spec)}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
} else {
  generate(target, false);
}
