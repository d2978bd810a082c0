// One timed merge for `npm run bench -- merge`, in a process of its own so that its peak RSS is
// its own: `node bench/merge-child.mjs <library entry> <config.yml> <out-dir> [jobs]`. The library
// entry is dist/merge/run.js (the compiled package, as `amalgam merge` runs it) or, under tsx,
// src/merge/run.ts. Prints one line of JSON: runMerge's wall time (planning, reading, merging,
// writing, fsync, rename; not Node's start-up), CPU time and peak RSS (VmHWM, threads included).
import { readFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const [entry, configPath, outDir, jobsArg] = process.argv.slice(2);
if (!entry || !configPath || !outDir) {
  console.error('usage: node bench/merge-child.mjs <library entry> <config.yml> <out-dir> [jobs]');
  process.exit(2);
}
const jobs = jobsArg ? Number(jobsArg) : undefined;
const { runMerge } = await import(pathToFileURL(resolve(entry)).href);
const t0 = performance.now();
const r = await runMerge(configPath, outDir, { baseDir: dirname(configPath), overwrite: true, writeModelCard: true, ...(jobs ? { jobs } : {}) });
const seconds = (performance.now() - t0) / 1000;
const usage = process.resourceUsage();
let peakRss = usage.maxRSS * 1024;
try {
  const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(await readFile('/proc/self/status', 'utf8'));
  if (m) peakRss = Number(m[1]) * 1024;
} catch {
  // Not Linux: maxRSS stands.
}
const e = r.execution;
console.log(
  JSON.stringify({
    seconds,
    peakRss,
    userSeconds: usage.userCPUTime / 1e6,
    systemSeconds: usage.systemCPUTime / 1e6,
    jobs: e.jobs,
    bytesRead: e.bytesRead,
    bytesWritten: e.bytesWritten,
    memoryBudget: e.memoryBudget,
    peakInFlightBytes: e.peakInFlightBytes,
  }),
);
