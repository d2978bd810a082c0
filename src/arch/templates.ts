/**
 * Weight-name templates: `${layer_index}`, `${layer_index+k}` / `${layer_index-k}` and
 * `${num_layers}`, plus small helpers shared by resolution and inference.
 */

const PLACEHOLDER = /\$\{(layer_index|num_layers)(?:([+-])(\d+))?\}/g;

/** True when the template contains a layer-index placeholder. */
export function isLayerTemplate(template: string): boolean {
  return /\$\{layer_index(?:[+-]\d+)?\}/.test(template);
}

/** Substitute the placeholders of a template. */
export function expandTemplate(template: string, layer: number | undefined, numLayers: number): string {
  return template.replace(PLACEHOLDER, (whole, what: string, sign?: string, k?: string) => {
    const off = sign ? (sign === '-' ? -1 : 1) * Number(k) : 0;
    if (what === 'num_layers') return String(numLayers + off);
    if (layer === undefined) return whole;
    return String(layer + off);
  });
}

/** Placeholders that are neither `${layer_index[±k]}` nor `${num_layers[±k]}`. */
export function unknownPlaceholders(template: string): string[] {
  const all = template.match(/\$\{[^}]*\}/g) ?? [];
  return all.filter((p) => !/^\$\{(layer_index|num_layers)(?:[+-]\d+)?\}$/.test(p));
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * A matcher that recovers the layer index from a concrete name produced by a layer template, or
 * undefined when the name does not come from the template.
 */
export function layerMatcher(template: string, numLayers: number): (name: string) => number | undefined {
  let firstOffset: number | undefined;
  let src = '';
  let last = 0;
  for (const m of template.matchAll(PLACEHOLDER)) {
    src += escapeRegExp(template.slice(last, m.index));
    if (m[1] === 'num_layers') {
      src += escapeRegExp(expandTemplate(m[0], undefined, numLayers));
    } else {
      if (firstOffset === undefined) firstOffset = m[2] ? (m[2] === '-' ? -1 : 1) * Number(m[3]) : 0;
      src += '(\\d+)';
    }
    last = m.index! + m[0].length;
  }
  src += escapeRegExp(template.slice(last));
  const re = new RegExp(`^${src}$`);
  return (name: string) => {
    const m = re.exec(name);
    if (!m || firstOffset === undefined) return undefined;
    const layer = Number(m[1]) - firstOffset;
    if (!Number.isSafeInteger(layer) || layer < 0) return undefined;
    return expandTemplate(template, layer, numLayers) === name ? layer : undefined;
  };
}

/** Value at a dotted path of a config object (`text_config.num_hidden_layers`). */
export function configValue(config: unknown, path: string): unknown {
  let cur: unknown = config;
  for (const part of path.split('.')) {
    if (cur === null || typeof cur !== 'object' || Array.isArray(cur)) return undefined;
    if (!Object.prototype.hasOwnProperty.call(cur, part)) return undefined;
    cur = (cur as Record<string, unknown>)[part];
  }
  return cur;
}

/** "a, b, c and 4 more" */
export function listNames(names: readonly string[], max = 5): string {
  const shown = names.slice(0, max).join(', ');
  return names.length > max ? `${shown} and ${names.length - max} more` : shown;
}
