/** Model Breadcrumbs with TIES sign election. */
import { makeGtaMethod } from '../gta.js';

export const breadcrumbsTies = makeGtaMethod({
  name: 'breadcrumbs_ties',
  prettyName: 'Model Breadcrumbs with TIES',
  reference: 'https://arxiv.org/abs/2312.06795',
  sparsification: 'magnitude_outliers',
  consensus: 'sum',
  defaultNormalize: false,
  defaultRescale: false,
});
