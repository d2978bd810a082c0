/** DELLA without sign election (plain weighted sum). */
import { makeGtaMethod } from '../gta.js';
import { withChunkedRandom } from '../random-chunked.js';

export const dellaLinear = withChunkedRandom(
  makeGtaMethod({
    name: 'della_linear',
    prettyName: 'Linear DELLA',
    reference: 'https://arxiv.org/abs/2406.11617',
    sparsification: 'della_magprune',
    consensus: null,
    defaultNormalize: false,
    defaultRescale: true,
  }),
);
