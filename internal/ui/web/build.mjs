// Builds the dashboard into ../dist: index.html, app.js and app.css, the
// only files there. The output depends on the sources alone (no
// timestamps, paths or source maps), so a rebuild of unchanged sources is
// byte-identical to the committed copy.
import { build } from "esbuild";
import { copyFile, mkdir, readdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "..", "dist");

await mkdir(dist, { recursive: true });
// Whatever an earlier build left that this one does not write goes.
for (const name of await readdir(dist)) {
  await rm(join(dist, name), { recursive: true, force: true });
}

await build({
  absWorkingDir: here,
  entryPoints: ["src/main.ts"],
  outfile: join(dist, "app.js"),
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2022"],
  platform: "browser",
  sourcemap: false,
  // Licences of bundled code (xterm.js) are kept, at the end of the file.
  legalComments: "eof",
  charset: "utf8",
  logLevel: "warning",
});
await copyFile(join(here, "src", "index.html"), join(dist, "index.html"));
