/** Worker thread of `osrmInitParallel`: solves one covariance-mode eigenproblem per message. */
import { parentPort } from 'node:worker_threads';
import { Rng } from '../tensor/rng.js';
import { covarianceModeBasis } from './init.js';
import type { EigenJob, EigenReply } from './parallel.js';

const port = parentPort;
if (!port) throw new Error('eigen-worker.ts runs as a worker thread only');
port.on('message', (job: EigenJob) => {
  let reply: EigenReply;
  try {
    const r = covarianceModeBasis(job.C, job.d, job.rank, new Rng(job.seed));
    reply = { id: job.id, ok: true, ...r };
    port.postMessage(reply, [r.A.buffer as ArrayBuffer, r.eigenvalues.buffer as ArrayBuffer]);
  } catch (e) {
    reply = { id: job.id, ok: false, message: e instanceof Error ? e.message : String(e) };
    port.postMessage(reply);
  }
});
