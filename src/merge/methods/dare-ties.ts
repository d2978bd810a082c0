/** DARE TIES: Bernoulli(density) keep-mask with L1 rescale, then TIES sign election. */
import { makeGtaMethod } from '../gta.js';
import { withChunkedRandom } from '../random-chunked.js';

export const dareTies = withChunkedRandom(
  makeGtaMethod({
    name: 'dare_ties',
    prettyName: 'DARE TIES',
    reference: 'https://arxiv.org/abs/2311.03099',
    sparsification: 'random',
    consensus: 'sum',
    defaultNormalize: false,
    defaultRescale: true,
  }),
);
