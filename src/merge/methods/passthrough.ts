/** Passthrough: the single input tensor, optionally multiplied by `scale` (layer stacking). */
import { AmalgamError } from '../../errors.js';
import { noInputs, output } from '../common.js';
import { modelNumberOrUndefined } from '../params.js';
import type { MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

export const passthrough: MergeMethod = {
  name: 'passthrough',
  prettyName: 'Passthrough',
  globalParams: {},
  perModelParams: {
    scale: { type: 'number', description: 'multiply the tensor by this factor' },
  },
  needsBase: 'none',
  randomized: false,

  validate(_params: ResolvedParams, vctx: ValidateContext): void {
    if (vctx.models.length > 1) {
      throw new AmalgamError('E_CONFIG', `passthrough takes exactly one model per tensor, got ${vctx.models.join(', ')}`, {
        key: vctx.tensorName,
        hint: 'use slices: to stack layers from several models',
      });
    }
  },

  merge(ctx: MergeContext): MergeOutput {
    if (ctx.inputs.length === 0) noInputs(ctx, 'passthrough');
    if (ctx.inputs.length !== 1) {
      throw new AmalgamError('E_CONFIG', `passthrough takes exactly one model per tensor, got ${ctx.inputs.map((t) => t.model).join(', ')}`, {
        key: ctx.tensorName,
        hint: 'use slices: to stack layers from several models',
      });
    }
    const t = ctx.inputs[0];
    const scale = modelNumberOrUndefined(ctx, t.model, 'scale');
    if (scale === undefined) return output(t.data.slice(), t.shape);
    const out = new Float32Array(t.data.length);
    for (let i = 0; i < out.length; i++) out[i] = t.data[i] * scale;
    return output(out, t.shape);
  },
};
