/**
 * `osrmInit` with the covariance-mode eigenproblems of wide feature groups spread over worker
 * threads. Each (task, group) problem is independent and draws from its own derived seed, so the
 * result is the same, bit for bit, as `osrmInit`'s.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { AmalgamError } from '../errors.js';
import type { FeatureGroup, TaskFeatureStats } from './stats.js';
import { FULL_EIGH_MAX_DIM, checkAligned, derivedSeed, osrmInit, othersSecondMoment, type GroupInit, type LoraInitKind, type OsrmOptions, type TaskInit } from './init.js';

/** One eigenproblem for a worker: the other tasks' second moment C (d × d) of one group. */
export interface EigenJob {
  id: number;
  C: Float64Array;
  d: number;
  rank: number;
  seed: number;
}

export type EigenReply =
  | { id: number; ok: true; A: Float64Array; eigenvalues: Float64Array; maxEigenvalue: number; seededDimension: number }
  | { id: number; ok: false; message: string };

function spawnEigenWorker(): Worker {
  const self = import.meta.url;
  if (self.endsWith('.ts')) {
    // Running from TypeScript sources (tests, tsx): the worker registers the same loader first.
    const api = import.meta.resolve('tsx/esm/api');
    const target = new URL('./eigen-worker.ts', self).href;
    return new Worker(`import(${JSON.stringify(api)}).then((m) => { m.register(); return import(${JSON.stringify(target)}); });`, { eval: true });
  }
  return new Worker(new URL('./eigen-worker.js', self));
}

/**
 * As `osrmInit`, with up to `jobs` worker threads (default: the number of cores) for covariance
 * mode when a feature group is wider than the width up to which the full decomposition is used;
 * otherwise `osrmInit` itself. At most `jobs` second-moment matrices exist at a time.
 */
export async function osrmInitParallel(stats: readonly TaskFeatureStats[], opts: OsrmOptions, jobs = availableParallelism()): Promise<TaskInit[]> {
  const wide = stats[0]?.groups.some((g) => g.group.dim > FULL_EIGH_MAX_DIM) ?? false;
  if (opts.mode !== 'covariance' || jobs <= 1 || !wide) return osrmInit(stats, opts);
  checkAligned(stats);
  const seed = opts.seed ?? 0;
  const kind: LoraInitKind = 'osrm-covariance';
  const problems: { t: number; gi: number; group: FeatureGroup }[] = [];
  stats.forEach((st, t) => st.groups.forEach((gs, gi) => problems.push({ t, gi, group: gs.group })));
  const results: GroupInit[][] = stats.map((st) => new Array<GroupInit>(st.groups.length));
  const workers = Array.from({ length: Math.min(jobs, problems.length) }, spawnEigenWorker);
  try {
    let next = 0;
    await Promise.all(
      workers.map(async (w) => {
        while (next < problems.length) {
          const id = next++;
          const { t, gi, group } = problems[id]!;
          const C = othersSecondMoment(stats, t, gi, opts.center ?? false);
          const job: EigenJob = { id, C, d: group.dim, rank: opts.rank, seed: derivedSeed(seed, stats[t]!.task, group.name) };
          const reply = await new Promise<EigenReply>((resolve, reject) => {
            const onMessage = (m: EigenReply) => {
              w.off('error', onError);
              resolve(m);
            };
            const onError = (e: Error) => {
              w.off('message', onMessage);
              reject(e);
            };
            w.once('message', onMessage);
            w.once('error', onError);
            w.postMessage(job, [C.buffer as ArrayBuffer]);
          });
          if (!reply.ok) throw new AmalgamError('E_USAGE', reply.message, { key: group.name });
          results[t]![gi] = { group, A: reply.A, eigenvalues: reply.eigenvalues, maxEigenvalue: reply.maxEigenvalue, seededDimension: reply.seededDimension };
        }
      }),
    );
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
  }
  return stats.map((st, t) => ({ task: st.task, kind, rank: opts.rank, seed, groups: results[t]! }));
}
