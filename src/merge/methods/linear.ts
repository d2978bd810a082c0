/** Linear (model soup): Σ wᵢxᵢ / Σ wᵢ, or Σ wᵢxᵢ without normalisation. */
import { AmalgamError } from '../../errors.js';
import { noInputs, output } from '../common.js';
import { globalBool, modelNumber, resolvedModelNumber } from '../params.js';
import { linearWasm } from '../blocks-wasm.js';
import { CHUNK_VALUES } from '../chunked.js';
import { rectifyEmbedShapes, sameShape } from '../tensor-ops.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

/** Weight sums closer to zero than this cannot be normalised. */
const ZERO_SUM = 1e-8;

function zeroSum(tensorName: string, sum: number): AmalgamError {
  return new AmalgamError('E_CONFIG', `linear: the weights sum to ${sum}, so normalize: true would divide by zero`, {
    key: tensorName,
    hint: 'change the weights or set normalize: false',
  });
}

export const linear: MergeMethod = {
  name: 'linear',
  prettyName: 'Linear',
  reference: 'https://arxiv.org/abs/2203.05482',
  globalParams: {
    normalize: { type: 'boolean', default: true, description: 'divide by the sum of weights' },
  },
  perModelParams: {
    weight: { type: 'number', required: true, description: 'weight of the model' },
  },
  needsBase: 'none',
  randomized: false,

  validate(params: ResolvedParams, vctx: ValidateContext): void {
    if (params.global.normalize !== true) return;
    let sum = 0;
    for (const m of vctx.models) sum += resolvedModelNumber(params, m, 'weight') ?? 0;
    if (vctx.models.length > 0 && Math.abs(sum) < ZERO_SUM) throw zeroSum(vctx.tensorName, sum);
  },

  merge(ctx: MergeContext): MergeOutput {
    if (ctx.inputs.length === 0) noInputs(ctx, 'linear');
    const inputs = rectifyEmbedShapes(ctx.inputs, ctx.tensorName, ctx.isEmbed, 'linear', ctx.warn);
    const { weights, divisor } = weighting(ctx, inputs);
    const out = weightedSum(
      inputs.map((t) => t.data),
      weights,
      divisor,
    );
    return output(out, inputs[0].shape);
  },

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    const n = out.length;
    if (inputs.length === 0 || inputs.some((t) => t.length !== n || !sameShape(t.shape, inputs[0]!.shape))) return false;
    const { weights, divisor } = weighting({ ...ctx, inputs: [] }, inputs);
    const B = Math.min(CHUNK_VALUES, n);
    const acc = new Float64Array(B);
    const x = new Float32Array(B);
    const res = new Float32Array(B);
    const block = (from: number, count: number): void => {
      for (let start = from; start < from + count; start += B) {
        const len = Math.min(B, from + count - start);
        const xs = x.subarray(0, len);
        acc.fill(0);
        for (let k = 0; k < inputs.length; k++) {
          inputs[k]!.read(start, xs);
          accumulate(acc, xs, weights[k]!, len);
        }
        const r = res.subarray(0, len);
        finish(acc, r, divisor, len);
        out.write(start, r);
      }
    };
    if (!linearWasm(inputs.map((t) => t.stored), weights, divisor, out.stored, block)) block(0, n);
    return true;
  },
};

/** Each model's weight and the divisor (the weights' sum with `normalize`, else 1), or the zero-sum error. */
function weighting(ctx: MergeContext, inputs: readonly { model: string }[]): { weights: number[]; divisor: number } {
  const weights = inputs.map((t) => modelNumber(ctx, t.model, 'weight'));
  const normalize = globalBool(ctx, 'normalize');
  let sum = 0;
  for (const w of weights) sum += w;
  if (normalize && Math.abs(sum) < ZERO_SUM) throw zeroSum(ctx.tensorName, sum);
  return { weights, divisor: normalize ? sum : 1 };
}

function accumulate(acc: Float64Array, x: Float32Array, w: number, len: number): void {
  for (let j = 0; j < len; j++) acc[j] += w * x[j]!;
}

function finish(acc: Float64Array, out: Float32Array, divisor: number, len: number): void {
  if (divisor === 1) for (let j = 0; j < len; j++) out[j] = acc[j]!;
  else for (let j = 0; j < len; j++) out[j] = acc[j]! / divisor;
}

/** Values per block of `weightedSum`'s float64 accumulator. */
const BLOCK = CHUNK_VALUES;

/**
 * Σₖ wₖ·xₖ / divisor, each element accumulated in float64 from 0 in model order and rounded to
 * float32 once. Block by block and model by model, so every inner loop reads one array.
 */
export function weightedSum(xs: readonly Float32Array[], weights: readonly number[], divisor: number): Float32Array {
  const n = xs[0]!.length;
  const out = new Float32Array(n);
  const acc = new Float64Array(Math.min(BLOCK, n));
  for (let start = 0; start < n; start += BLOCK) {
    const len = Math.min(BLOCK, n - start);
    acc.fill(0, 0, len);
    for (let k = 0; k < xs.length; k++) {
      const x = xs[k]!;
      // A shorter input reads as NaN past its end, as indexing it element by element did.
      const have = Math.max(0, Math.min(len, x.length - start));
      accumulate(acc, x.subarray(start, start + have), weights[k]!, have);
      for (let j = have; j < len; j++) acc[j] += NaN;
    }
    finish(acc, out.subarray(start, start + len), divisor, len);
  }
  return out;
}
