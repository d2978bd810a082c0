/**
 * Model Stock: interpolates between the base and the average of the models with a ratio derived
 * from the mean pairwise cosine of their task vectors (over the whole tensor, or per row).
 */
import { AmalgamError } from '../../errors.js';
import { copyOf, output, splitBase } from '../common.js';
import { globalBool } from '../params.js';
import { rectifyEmbedShapes, subtract } from '../tensor-ops.js';
import type { MergeContext, MergeMethod, MergeOutput, ResolvedParams, ValidateContext } from '../types.js';

/** Denominators 1 + (N − 1)·cos θ closer to zero than this use t = 0 (the base). */
const ZERO_DENOMINATOR = 1e-6;

export const modelStock: MergeMethod = {
  name: 'model_stock',
  prettyName: 'Model Stock',
  reference: 'https://arxiv.org/abs/2403.19522',
  globalParams: {
    filter_wise: { type: 'boolean', default: false, description: 'compute the ratio per row instead of per tensor' },
  },
  perModelParams: {},
  needsBase: 'required',
  randomized: false,

  validate(_params: ResolvedParams, vctx: ValidateContext): void {
    if (vctx.base === null) {
      throw new AmalgamError('E_CONFIG', 'model_stock needs a base model', { key: vctx.tensorName, hint: 'set base_model:' });
    }
  },

  merge(ctx: MergeContext): MergeOutput | null {
    const { base, others } = splitBase(ctx, 'model_stock', true);
    if (others.length === 0) return copyOf(base!);
    if (others.length < 2) {
      if (ctx.isOptional) {
        ctx.warn?.(`${ctx.tensorName}: optional tensor present in fewer than 3 models; model_stock leaves it out`);
        return null;
      }
      throw new AmalgamError('E_CONFIG', `model_stock needs the base model plus at least two others, got ${ctx.inputs.length} models with this tensor`, {
        key: ctx.tensorName,
      });
    }
    const rect = rectifyEmbedShapes([base!, ...others], ctx.tensorName, ctx.isEmbed, 'model_stock', ctx.warn);
    const b = rect[0].data;
    const ws = rect.slice(1).map((t) => t.data);
    const shape = rect[0].shape;
    const n = b.length;
    const N = ws.length;
    const offsets = ws.map((w) => subtract(w, b));
    const filterWise = globalBool(ctx, 'filter_wise');
    const rowLen = filterWise && shape.length >= 1 ? (shape.length === 1 ? n : shape[shape.length - 1]) : n;
    const rows = rowLen === 0 ? 0 : n / rowLen;
    const out = new Float32Array(n);
    const norms = new Float64Array(N);
    let warned = false;
    for (let r = 0; r < rows; r++) {
      const start = r * rowLen;
      const end = start + rowLen;
      for (let k = 0; k < N; k++) {
        let s = 0;
        const o = offsets[k];
        for (let i = start; i < end; i++) s += o[i] * o[i];
        norms[k] = Math.sqrt(s);
      }
      let cosSum = 0;
      let pairs = 0;
      for (let i = 0; i < N; i++) {
        for (let j = i + 1; j < N; j++) {
          const oi = offsets[i];
          const oj = offsets[j];
          let d = 0;
          for (let e = start; e < end; e++) d += oi[e] * oj[e];
          const c = d / Math.max(norms[i] * norms[j], 1e-6);
          cosSum += Math.min(1, Math.max(-1, c));
          pairs++;
        }
      }
      const cos = cosSum / pairs;
      const den = 1 + (N - 1) * cos;
      let t: number;
      if (Math.abs(den) < ZERO_DENOMINATOR) {
        t = 0;
        if (!warned) ctx.warn?.(`${ctx.tensorName}: model_stock ratio has a zero denominator (mean cosine ${cos}); using the base model`);
        warned = true;
      } else {
        t = (N * cos) / den;
      }
      for (let i = start; i < end; i++) {
        let avg = 0;
        for (let k = 0; k < N; k++) avg += ws[k][i];
        avg /= N;
        out[i] = t * avg + (1 - t) * b[i];
      }
    }
    return output(out, shape);
  },
};
