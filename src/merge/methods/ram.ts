/**
 * RAM (reinforced agent merging): a change made by one model is added as is; changes made by
 * several models are averaged over the models that made them.
 */
import { copyOf, output, splitBase } from '../common.js';
import { globalNumber } from '../params.js';
import { CHUNK_VALUES, sameLayout, splitChunked } from '../chunked.js';
import { requireSameShape, subtract } from '../tensor-ops.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeInput, MergeMethod, MergeOutput } from '../types.js';

/** Values per block. */
const BLOCK = CHUNK_VALUES;

/** One block: the base's values and each model's task vector (x − b, float32). */
type RamBlocks = (start: number, len: number) => { b: Float32Array; deltas: readonly Float32Array[] };

/**
 * Shared core of `ram` and `ramplus_tl`. With `plus`, each model's unique changes are scaled by
 * its λ = 1 + r·clip(shared/unique, 0, α); without, λ = 1.
 */
export function ramMerge(base: MergeInput, others: readonly MergeInput[], epsilon: number, plus: { r: number; alpha: number } | null): Float32Array {
  const b = base.data;
  const n = b.length;
  const deltas = others.map((t) => subtract(t.data, b));
  const out = new Float32Array(n);
  ramRun(
    n,
    others.length,
    (start, len) => ({ b: b.subarray(start, start + len), deltas: deltas.map((d) => d.subarray(start, start + len)) }),
    epsilon,
    plus,
    (start, res) => out.set(res, start),
  );
  return out;
}

/** `ramMerge` over stored inputs block by block: the same values. */
export function ramChunked(base: ChunkedInput, others: readonly ChunkedInput[], epsilon: number, plus: { r: number; alpha: number } | null, out: ChunkWriter): void {
  const b = new Float32Array(BLOCK);
  const x = new Float32Array(BLOCK);
  const deltas = others.map(() => new Float32Array(BLOCK));
  const blocks: RamBlocks = (start, len) => {
    const bb = b.subarray(0, len);
    base.read(start, bb);
    return {
      b: bb,
      deltas: others.map((o, k) => {
        const d = deltas[k]!.subarray(0, len);
        o.read(start, x.subarray(0, len));
        for (let j = 0; j < len; j++) d[j] = x[j]! - bb[j]!;
        return d;
      }),
    };
  };
  ramRun(out.length, others.length, blocks, epsilon, plus, (start, res) => out.write(start, res));
}

function ramRun(
  n: number,
  m: number,
  blocks: RamBlocks,
  epsilon: number,
  plus: { r: number; alpha: number } | null,
  write: (start: number, res: Float32Array) => void,
): void {
  const counts = new Uint16Array(Math.min(BLOCK, n));
  const lambdas = new Float64Array(m).fill(1);
  if (plus) {
    const shared = new Float64Array(m);
    const unique = new Float64Array(m);
    for (let start = 0; start < n; start += BLOCK) {
      const len = Math.min(BLOCK, n - start);
      const { deltas } = blocks(start, len);
      countBlock(deltas, len, epsilon, counts);
      deltas.forEach((d, k) => {
        for (let i = 0; i < len; i++) {
          if (Math.abs(d[i]!) > epsilon) {
            if (counts[i]! > 1) shared[k]++;
            else if (counts[i] === 1) unique[k]++;
          }
        }
      });
    }
    for (let k = 0; k < m; k++) {
      const rho = shared[k]! / Math.max(unique[k]!, epsilon);
      lambdas[k] = 1 + plus.r * Math.min(plus.alpha, Math.max(0, rho));
    }
  }
  const res = new Float32Array(Math.min(BLOCK, n));
  for (let start = 0; start < n; start += BLOCK) {
    const len = Math.min(BLOCK, n - start);
    const { b, deltas } = blocks(start, len);
    countBlock(deltas, len, epsilon, counts);
    for (let i = 0; i < len; i++) {
      const c = counts[i]!;
      let acc = 0;
      if (c === 1) {
        for (let k = 0; k < m; k++) {
          const d = deltas[k]![i]!;
          if (Math.abs(d) > epsilon) acc += d * lambdas[k]!;
        }
      } else if (c > 1) {
        for (let k = 0; k < m; k++) {
          const d = deltas[k]![i]!;
          if (Math.abs(d) > epsilon) acc += d / c;
        }
      }
      res[i] = b[i]! + acc;
    }
    write(start, res.subarray(0, len));
  }
}

/** Per value, how many task vectors change it by more than `epsilon`. */
function countBlock(deltas: readonly Float32Array[], len: number, epsilon: number, counts: Uint16Array): void {
  counts.fill(0, 0, len);
  for (const d of deltas) for (let i = 0; i < len; i++) if (Math.abs(d[i]!) > epsilon) counts[i]++;
}

export const ram: MergeMethod = {
  name: 'ram',
  prettyName: 'Reinforced Agent Merging',
  reference: 'https://arxiv.org/abs/2601.13572',
  globalParams: {
    epsilon: { type: 'number', default: 1e-5, description: 'changes at or below this magnitude are ignored' },
  },
  perModelParams: {},
  needsBase: 'required',
  randomized: false,

  merge(ctx: MergeContext): MergeOutput {
    const { base, others } = splitBase(ctx, 'ram', true);
    if (others.length === 0) return copyOf(base!);
    requireSameShape([base!, ...others], ctx.tensorName, 'ram');
    return output(ramMerge(base!, others, globalNumber(ctx, 'epsilon'), null), base!.shape);
  },

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    const split = splitChunked(ctx.base, inputs);
    if (!split || split.others.length === 0 || !sameLayout(inputs, out.length)) return false;
    ramChunked(split.base, split.others, globalNumber({ ...ctx, inputs: [] }, 'epsilon'), null, out);
    return true;
  },
};
