/** DARE (linear): Bernoulli(density) keep-mask per task vector with L1 rescale, plain weighted sum. */
import { makeGtaMethod } from '../gta.js';
import { withChunkedRandom } from '../random-chunked.js';

export const dareLinear = withChunkedRandom(
  makeGtaMethod({
    name: 'dare_linear',
    prettyName: 'Linear DARE',
    reference: 'https://arxiv.org/abs/2311.03099',
    sparsification: 'random',
    consensus: null,
    defaultNormalize: false,
    defaultRescale: true,
  }),
);
