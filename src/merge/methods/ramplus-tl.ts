/**
 * RAM+ (tensor-local): RAM with each model's unique changes amplified by
 * λ = 1 + r·clip(shared/unique, 0, α).
 */
import { copyOf, output, splitBase } from '../common.js';
import { globalNumber } from '../params.js';
import { requireSameShape } from '../tensor-ops.js';
import { sameLayout, splitChunked } from '../chunked.js';
import type { ChunkedInput, ChunkWriter, MergeContext, MergeMethod, MergeOutput } from '../types.js';
import { ramChunked, ramMerge } from './ram.js';

export const ramplusTl: MergeMethod = {
  name: 'ramplus_tl',
  prettyName: 'Reinforced Agent Merging Plus (Tensor-Local)',
  reference: 'https://arxiv.org/abs/2601.13572',
  globalParams: {
    epsilon: { type: 'number', default: 1e-5, description: 'changes at or below this magnitude are ignored' },
    r: { type: 'number', default: 0.1, description: 'amplification rate of unique changes' },
    alpha: { type: 'number', default: 0.2, description: 'cap on the shared/unique ratio' },
  },
  perModelParams: {},
  needsBase: 'required',
  randomized: false,

  merge(ctx: MergeContext): MergeOutput {
    const { base, others } = splitBase(ctx, 'ramplus_tl', true);
    if (others.length === 0) return copyOf(base!);
    requireSameShape([base!, ...others], ctx.tensorName, 'ramplus_tl');
    const plus = { r: globalNumber(ctx, 'r'), alpha: globalNumber(ctx, 'alpha') };
    return output(ramMerge(base!, others, globalNumber(ctx, 'epsilon'), plus), base!.shape);
  },

  mergeChunked(ctx: Omit<MergeContext, 'inputs'>, inputs: readonly ChunkedInput[], out: ChunkWriter): boolean {
    const split = splitChunked(ctx.base, inputs);
    if (!split || split.others.length === 0 || !sameLayout(inputs, out.length)) return false;
    const c = { ...ctx, inputs: [] };
    const plus = { r: globalNumber(c, 'r'), alpha: globalNumber(c, 'alpha') };
    ramChunked(split.base, split.others, globalNumber(c, 'epsilon'), plus, out);
    return true;
  },
};
