/**
 * NearSwap: where the other model is within `t` of the base it is taken over; elsewhere the
 * result stays close to the base, with weight t/|base − x| on the other model.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, output, splitBase } from '../common.js';
import { globalNumber } from '../params.js';
import { CHUNK_VALUES, sameLayout, splitChunked } from '../chunked.js';
import { requireSameShape } from '../tensor-ops.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

export const nearswap: MergeMethod = {
  name: 'nearswap',
  prettyName: 'NearSwap',
  reference: 'https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001',
  globalParams: {
    t: { type: 'number', required: true, description: 'sameness threshold' },
  },
  perModelParams: {},
  needsBase: 'required',
  randomized: false,

  validate(_params: ResolvedParams, vctx: ValidateContext): void {
    if (vctx.base === null) {
      throw new AmalgamError('E_CONFIG', 'nearswap needs a base model', { key: vctx.tensorName, hint: 'set base_model:' });
    }
    const others = vctx.models.filter((m) => m !== vctx.base);
    if (others.length > 1) {
      throw new AmalgamError('E_CONFIG', `nearswap merges the base model with exactly one other model, got ${others.join(', ')}`, {
        key: vctx.tensorName,
      });
    }
  },

  merge(ctx: MergeContext): MergeOutput {
    const { base, others } = splitBase(ctx, 'nearswap', true);
    if (others.length === 0) return copyOf(base!);
    if (others.length !== 1) {
      throw new AmalgamError('E_CONFIG', `nearswap merges the base model with exactly one other model, got ${others.length}`, {
        key: ctx.tensorName,
      });
    }
    const x = others[0];
    requireSameShape([base!, x], ctx.tensorName, 'nearswap');
    const t = globalNumber(ctx, 't');
    const out = new Float32Array(base!.data.length);
    nearswapBlock(t, base!.data, x.data, out, out.length);
    return output(out, base!.shape);
  },

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    const split = splitChunked(ctx.base, inputs);
    if (!split || split.others.length !== 1 || !sameLayout(inputs, out.length)) return false;
    const t = globalNumber({ ...ctx, inputs: [] }, 't');
    const n = out.length;
    const B = Math.min(CHUNK_VALUES, n);
    const a = new Float32Array(B);
    const x = new Float32Array(B);
    const res = new Float32Array(B);
    for (let start = 0; start < n; start += B) {
      const len = Math.min(B, n - start);
      split.base.read(start, a.subarray(0, len));
      split.others[0]!.read(start, x.subarray(0, len));
      nearswapBlock(t, a, x, res, len);
      out.write(start, res.subarray(0, len));
    }
    return true;
  },
};

/** The first `len` values of the result from the base's (`a`) and the other model's (`x`). */
function nearswapBlock(t: number, a: Float32Array, x: Float32Array, out: Float32Array, len: number): void {
  for (let i = 0; i < len; i++) {
    const w = Math.min(1, Math.max(0, t / Math.max(Math.abs(a[i]! - x[i]!), 1e-6)));
    out[i] = w * x[i]! + (1 - w) * a[i]!;
  }
}
