/** TIES: magnitude top-k per task vector, then sign election by the sum of weighted deltas. */
import { makeGtaMethod } from '../gta.js';

export const ties = makeGtaMethod({
  name: 'ties',
  prettyName: 'TIES',
  reference: 'https://arxiv.org/abs/2306.01708',
  sparsification: 'magnitude',
  consensus: 'sum',
  defaultNormalize: true,
  defaultRescale: false,
});
