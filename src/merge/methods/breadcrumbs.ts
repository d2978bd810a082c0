/** Model Breadcrumbs: drop the smallest and the γ largest magnitudes of each task vector, plain weighted sum. */
import { makeGtaMethod } from '../gta.js';

export const breadcrumbs = makeGtaMethod({
  name: 'breadcrumbs',
  prettyName: 'Model Breadcrumbs',
  reference: 'https://arxiv.org/abs/2312.06795',
  sparsification: 'magnitude_outliers',
  consensus: null,
  defaultNormalize: false,
  defaultRescale: false,
});
