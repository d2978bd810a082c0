/** DELLA: rank-based keep probabilities within each row, L1 rescale, TIES sign election. */
import { makeGtaMethod } from '../gta.js';
import { withChunkedRandom } from '../random-chunked.js';

export const della = withChunkedRandom(
  makeGtaMethod({
    name: 'della',
    prettyName: 'DELLA',
    reference: 'https://arxiv.org/abs/2406.11617',
    sparsification: 'della_magprune',
    consensus: 'sum',
    defaultNormalize: true,
    defaultRescale: true,
  }),
);
