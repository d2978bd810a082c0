/** Task arithmetic: base + Σ wᵢ(xᵢ − base). `density` is accepted but has no effect. */
import { makeGtaMethod } from '../gta.js';

export const taskArithmetic = makeGtaMethod({
  name: 'task_arithmetic',
  prettyName: 'Task Arithmetic',
  reference: 'https://arxiv.org/abs/2212.04089',
  sparsification: null,
  consensus: null,
  defaultNormalize: false,
  defaultRescale: false,
});
