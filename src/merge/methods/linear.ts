/** Linear (model soup): Σ wᵢxᵢ / Σ wᵢ, or Σ wᵢxᵢ without normalisation. */
import { AmalgamError } from '../../errors.js';
import { noInputs, output } from '../common.js';
import { globalBool, modelNumber, resolvedModelNumber } from '../params.js';
import { rectifyEmbedShapes } from '../tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

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
    const weights = inputs.map((t) => modelNumber(ctx, t.model, 'weight'));
    const normalize = globalBool(ctx, 'normalize');
    let sum = 0;
    for (const w of weights) sum += w;
    if (normalize && Math.abs(sum) < ZERO_SUM) throw zeroSum(ctx.tensorName, sum);
    const n = inputs[0].data.length;
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      let acc = 0;
      for (let k = 0; k < inputs.length; k++) acc += weights[k] * inputs[k].data[i];
      out[i] = normalize ? acc / sum : acc;
    }
    return output(out, inputs[0].shape);
  },
};
