/**
 * NearSwap: where the other model is within `t` of the base it is taken over; elsewhere the
 * result stays close to the base, with weight t/|base − x| on the other model.
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, output, splitBase } from '../common.js';
import { globalNumber } from '../params.js';
import { requireSameShape } from '../tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

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
    const a = base!.data;
    const out = new Float32Array(a.length);
    for (let i = 0; i < a.length; i++) {
      const w = Math.min(1, Math.max(0, t / Math.max(Math.abs(a[i] - x.data[i]), 1e-6)));
      out[i] = w * x.data[i] + (1 - w) * a[i];
    }
    return output(out, base!.shape);
  },
};
