/**
 * Learning-rate schedules: constant, linear warm-up then linear decay, linear warm-up then cosine
 * decay. A schedule maps the 0-based optimizer step s (0 … totalSteps − 1) to a learning rate.
 *
 * Warm-up (W steps): lr(s) = peak · (s + 1) / W for s < W, so step W − 1 reaches the peak.
 * Decay, with progress p = (s − W) / (T − W) over the remaining steps and floor f = minLrRatio:
 *   linear: peak · (1 − (1 − f) · p)
 *   cosine: peak · (f + (1 − f) · ½ (1 + cos π p))
 * Steps at or beyond T keep the final value peak · f. The constant schedule also honours warm-up.
 */
import { AmalgamError } from '../errors.js';

export type ScheduleKind = 'constant' | 'linear' | 'cosine';

export const SCHEDULE_KINDS: readonly ScheduleKind[] = ['constant', 'linear', 'cosine'];

export interface ScheduleOptions {
  kind: ScheduleKind;
  /** Peak learning rate. */
  lr: number;
  /** Total optimizer steps T (needed by the decaying schedules). */
  totalSteps: number;
  /** Warm-up steps W (default 0); a number in (0, 1) is a fraction of T, rounded. */
  warmup?: number;
  /** Final learning rate as a fraction of the peak (default 0). */
  minLrRatio?: number;
}

export type LrSchedule = (step: number) => number;

/** Warm-up steps from an absolute count or a fraction of the total. */
export function warmupSteps(warmup: number | undefined, totalSteps: number): number {
  const w = warmup ?? 0;
  if (!Number.isFinite(w) || w < 0) throw new AmalgamError('E_USAGE', `warm-up must be a non-negative number, got ${w}`);
  if (w > 0 && w < 1) return Math.round(w * totalSteps);
  return Math.floor(w);
}

/** Build a schedule function. */
export function makeSchedule(opts: ScheduleOptions): LrSchedule {
  const { kind, lr } = opts;
  const T = opts.totalSteps;
  if (!SCHEDULE_KINDS.includes(kind)) {
    throw new AmalgamError('E_USAGE', `unknown schedule '${String(kind)}'`, { hint: `use one of ${SCHEDULE_KINDS.join(', ')}` });
  }
  if (!Number.isFinite(lr) || lr < 0) throw new AmalgamError('E_USAGE', `learning rate must be a non-negative number, got ${lr}`);
  if (!Number.isSafeInteger(T) || T < 1) throw new AmalgamError('E_USAGE', `total steps must be a positive integer, got ${T}`);
  const W = warmupSteps(opts.warmup, T);
  const f = opts.minLrRatio ?? 0;
  if (!(f >= 0 && f <= 1)) throw new AmalgamError('E_USAGE', `minLrRatio must be in [0, 1], got ${f}`);
  const decaySteps = Math.max(1, T - W);
  return (s: number) => {
    if (s < W) return (lr * (s + 1)) / W;
    if (kind === 'constant') return lr;
    const p = Math.min(1, (s - W) / decaySteps);
    if (kind === 'linear') return lr * (1 - (1 - f) * p);
    return lr * (f + (1 - f) * 0.5 * (1 + Math.cos(Math.PI * p)));
  };
}
