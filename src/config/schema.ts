/**
 * zod schema of a mergekit merge configuration. Objects are strict (unknown keys are reported
 * together with the keys that are allowed there); values that may take several forms are
 * dispatched on their JavaScript type, so an error names the form the user evidently meant.
 */
import { z } from 'zod';
import { closestMatches } from './suggest.js';
import { makeModelReference, tryParseModelReference } from './model-ref.js';
import type {
  ConditionalParameter,
  ConfigDtype,
  InputModelDefinition,
  InputSliceDefinition,
  MergeConfig,
  ModelReference,
  ModelTokenEmbedding,
  OutputModuleDefinition,
  OutputSliceDefinition,
  ParameterMap,
  ParameterSetting,
  ScalarValue,
  TokenEmbeddingConfig,
  TokenEmbeddingSource,
  TokenizerConfig,
  TokenizerSource,
} from './types.js';

/** Marker message of a missing required key; replaced by "missing required key `name`". */
export const MISSING_KEY = '\u0000missing';

/** Parameters carried by the custom issues this schema raises. */
export interface IssueParams {
  /** The key at the end of the path is not allowed; these keys are. */
  unknownKey?: boolean;
  known?: string[];
  hint?: string;
}

function describeValue(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'a mapping';
  if (typeof v === 'string') return `the string ${JSON.stringify(v)}`;
  if (typeof v === 'number' && !Number.isFinite(v)) return String(v);
  return `${typeof v} ${String(v)}`;
}

const EXPECTED_WORDS: Record<string, string> = {
  string: 'a string',
  number: 'a number',
  int: 'an integer',
  boolean: 'true or false',
  array: 'a list',
  tuple: 'a list',
  object: 'a mapping',
  record: 'a mapping',
};

/** Default messages for issues raised without a schema-specific message. */
export function configErrorMap(iss: {
  code?: string;
  input?: unknown;
  expected?: string;
  values?: unknown[];
  origin?: string;
  minimum?: number | bigint;
  maximum?: number | bigint;
  inclusive?: boolean;
  message?: string;
}): string {
  switch (iss.code) {
    case 'invalid_type':
      if (iss.input === undefined) return MISSING_KEY;
      return `expected ${EXPECTED_WORDS[iss.expected ?? ''] ?? iss.expected}, got ${describeValue(iss.input)}`;
    case 'invalid_value':
      return `expected one of ${(iss.values ?? []).map((v) => `\`${String(v)}\``).join(', ')}, got ${describeValue(iss.input)}`;
    case 'too_small':
      if (iss.origin === 'array') return `expected at least ${iss.minimum} item(s)`;
      return `must be ${iss.inclusive ? '>=' : '>'} ${iss.minimum}, got ${describeValue(iss.input)}`;
    case 'too_big':
      if (iss.origin === 'array') return `expected at most ${iss.maximum} item(s)`;
      return `must be ${iss.inclusive ? '<=' : '<'} ${iss.maximum}, got ${describeValue(iss.input)}`;
    default:
      return iss.message ?? 'invalid value';
  }
}

const isPlainObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

/** Strict object: unknown keys are issues that list the allowed keys; null values of optional keys are dropped. */
function obj<S extends z.ZodRawShape>(shape: S) {
  const keys = Object.keys(shape);
  return z
    .looseObject(shape)
    .superRefine(
      (v, ctx) => {
        if (!isPlainObject(v)) return;
        for (const k of Object.keys(v)) {
          if (!keys.includes(k)) {
            const params: IssueParams = { unknownKey: true, known: keys };
            ctx.addIssue({ code: 'custom', path: [k], message: `unknown key \`${k}\``, params });
          }
        }
      },
      { when: () => true },
    )
    .transform((v) => {
      const out: Record<string, unknown> = {};
      for (const k of keys) {
        const x = (v as Record<string, unknown>)[k];
        if (x !== undefined && x !== null) out[k] = x;
      }
      return out as z.output<z.ZodObject<S>>;
    });
}

/** Optional key: absent or null gives undefined. */
function opt<T extends z.ZodType>(s: T) {
  return s.nullish().transform((v) => (v ?? undefined) as z.output<T> | undefined);
}

/**
 * Chooses a schema from the value (or returns an error message) and parses with it; the issues of
 * the chosen schema are reported at this position.
 */
function dispatch<T>(pick: (v: unknown) => z.ZodType<T> | { message: string; hint?: string }): z.ZodType<T> {
  return z.unknown().transform((v, ctx): T => {
    if (v === undefined) {
      ctx.addIssue({ code: 'custom', message: MISSING_KEY });
      return z.NEVER;
    }
    const s = pick(v);
    if (!(s instanceof z.ZodType)) {
      const params: IssueParams = s.hint ? { hint: s.hint } : {};
      ctx.addIssue({ code: 'custom', message: s.message, params });
      return z.NEVER;
    }
    const r = s.safeParse(v, { error: configErrorMap });
    if (!r.success) {
      for (const iss of r.error.issues) ctx.issues.push({ ...iss, input: v } as never);
      return z.NEVER;
    }
    return r.data;
  }) as unknown as z.ZodType<T>;
}

/** A string restricted to `values`; the error suggests the closest value (or an alias's target). */
function oneOf<T extends string>(values: readonly T[], what: string, aliases: Record<string, T> = {}): z.ZodType<T> {
  return dispatch<T>((v) => {
    if (typeof v === 'string' && (values as readonly string[]).includes(v)) return z.string() as unknown as z.ZodType<T>;
    const list = values.map((x) => `\`${x}\``).join(', ');
    let hint: string | undefined;
    if (typeof v === 'string') {
      const alias = aliases[v.toLowerCase()];
      const close = alias !== undefined ? [alias] : closestMatches(v, values, 1);
      if (close.length) hint = `did you mean \`${close[0]}\`?`;
    }
    return { message: `${what} must be one of ${list}, got ${describeValue(v)}`, hint };
  });
}

// ---------------------------------------------------------------------------------------------
// Parameter settings

const SETTING_FORMS =
  'a number, true/false, a string, a list of numbers (gradient), or a list of {filter, value} entries';

const scalarSchema = z.union([z.number(), z.boolean(), z.string()]) as z.ZodType<ScalarValue>;

const conditionSchema: z.ZodType<ConditionalParameter> = obj({
  filter: opt(z.string()),
  value: z.lazy(() => settingSchema),
}) as unknown as z.ZodType<ConditionalParameter>;

const listItemSchema = dispatch<ScalarValue | ConditionalParameter>((v) => {
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'string') return scalarSchema;
  if (isPlainObject(v)) return conditionSchema;
  return { message: `a list entry must be a number, true/false, a string or a {filter, value} entry, got ${describeValue(v)}` };
});

const settingListSchema = z
  .array(listItemSchema)
  .superRefine((list, ctx) => {
    if (list.length === 0) {
      ctx.addIssue({ code: 'custom', message: `an empty list is not a parameter value; expected ${SETTING_FORMS}` });
      return;
    }
    const conds = list.filter((e) => isPlainObject(e)).length;
    if (conds !== 0 && conds !== list.length) {
      ctx.addIssue({
        code: 'custom',
        message: 'a list mixes {filter, value} entries with plain values',
        params: { hint: 'write the plain value as a last entry `{value: ...}` without a filter' } satisfies IssueParams,
      });
    }
  })
  .transform((list) => list as ScalarValue[] | ConditionalParameter[]);

export const settingSchema: z.ZodType<ParameterSetting> = dispatch<ParameterSetting>((v) => {
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'string') return scalarSchema;
  if (Array.isArray(v)) return settingListSchema;
  if (isPlainObject(v)) return conditionSchema;
  return { message: `expected ${SETTING_FORMS}, got ${describeValue(v)}` };
});

const parameterMapSchema = opt(z.record(z.string(), settingSchema) as z.ZodType<ParameterMap>);

// ---------------------------------------------------------------------------------------------
// Model references

const modelPathObject = obj({ path: z.string(), revision: opt(z.string()) });

const modelPathSchema = dispatch<{ path: string; revision?: string }>((v) => {
  if (typeof v === 'string') {
    return z.string().transform((s, ctx) => {
      const r = tryParseModelReference(s);
      if (!r.ok || r.ref.adapter !== undefined) {
        ctx.addIssue({ code: 'custom', message: r.ok ? `\`${s}\` is not a plain model path` : r.message });
        return z.NEVER;
      }
      return r.ref.revision !== undefined ? { path: r.ref.model, revision: r.ref.revision } : { path: r.ref.model };
    });
  }
  if (isPlainObject(v)) return modelPathObject as z.ZodType<{ path: string; revision?: string }>;
  return { message: `expected a model path, got ${describeValue(v)}` };
});

const modelRefObject = obj({
  model: modelPathSchema,
  lora: opt(modelPathSchema),
  override_architecture: opt(z.string()),
}).transform((o) => makeModelReference(o.model, o.lora, o.override_architecture));

const modelRefString = z.string().transform((s, ctx): ModelReference => {
  const r = tryParseModelReference(s);
  if (!r.ok) {
    const params: IssueParams = { hint: 'write a model as path, path@revision or path+adapter_path' };
    ctx.addIssue({ code: 'custom', message: r.message, params });
    return z.NEVER;
  }
  return r.ref;
});

export const modelReferenceSchema: z.ZodType<ModelReference> = dispatch<ModelReference>((v) => {
  if (typeof v === 'string') return modelRefString;
  if (isPlainObject(v)) return modelRefObject;
  return {
    message: `expected a model reference (a folder path or hub id, optionally +adapter), got ${describeValue(v)}`,
    hint: typeof v === 'number' || typeof v === 'boolean' ? 'quote the name' : undefined,
  };
});

// ---------------------------------------------------------------------------------------------
// Models, slices, modules

const layerRangeSchema = dispatch<[number, number]>((v) => {
  const form = 'layer_range must be a list [start, end] of two integers (end exclusive)';
  if (!Array.isArray(v) || v.length !== 2 || !v.every((x) => typeof x === 'number' && Number.isInteger(x))) {
    return { message: `${form}, got ${Array.isArray(v) ? JSON.stringify(v) : describeValue(v)}` };
  }
  const [start, end] = v as [number, number];
  if (start < 0) return { message: `layer_range start must be >= 0, got [${start}, ${end}]` };
  if (end <= start) {
    return {
      message: `layer_range [${start}, ${end}] is empty`,
      hint: `the end is exclusive: [${start}, ${start + 1}] takes layer ${start} alone`,
    };
  }
  return z.tuple([z.number(), z.number()]);
});

export const inputModelSchema: z.ZodType<InputModelDefinition> = obj({
  model: modelReferenceSchema,
  parameters: parameterMapSchema,
});

export const inputSliceSchema: z.ZodType<InputSliceDefinition> = obj({
  model: modelReferenceSchema,
  layer_range: layerRangeSchema,
  parameters: parameterMapSchema,
});

export const outputSliceSchema: z.ZodType<OutputSliceDefinition> = obj({
  sources: z.array(inputSliceSchema).min(1, { error: 'a slice needs at least one source' }),
  base_model: opt(modelReferenceSchema),
  residual_weight: opt(z.number()),
  parameters: parameterMapSchema,
});

export const outputModuleSchema: z.ZodType<OutputModuleDefinition> = obj({
  models: opt(z.array(inputModelSchema)),
  slices: opt(z.array(outputSliceSchema)),
  parameters: parameterMapSchema,
});

// ---------------------------------------------------------------------------------------------
// Tokenizer

const tokenizerSourceSchema: z.ZodType<TokenizerSource> = dispatch<TokenizerSource>((v) => {
  if (v === 'union' || v === 'base') return z.literal(v);
  if (typeof v === 'string') return modelRefString;
  if (isPlainObject(v)) return modelRefObject;
  return { message: `expected \`union\`, \`base\` or a model reference, got ${describeValue(v)}` };
});

const modelTokenSchema: z.ZodType<ModelTokenEmbedding> = obj({
  kind: z.literal('model_token'),
  model: modelReferenceSchema,
  token: opt(z.string()),
  token_id: opt(z.number().int().min(0)),
}).superRefine((o, ctx) => {
  if (o.token === undefined && o.token_id === undefined) {
    ctx.addIssue({ code: 'custom', message: 'a model_token source needs `token` or `token_id`' });
  } else if (o.token !== undefined && o.token_id !== undefined) {
    ctx.addIssue({ code: 'custom', message: 'a model_token source takes only one of `token` and `token_id`' });
  }
}) as unknown as z.ZodType<ModelTokenEmbedding>;

const zeroEmbeddingSchema = obj({ kind: z.literal('zero') });

const tokenEmbeddingSourceSchema = dispatch<TokenEmbeddingSource>((v) => {
  if (typeof v === 'string') return modelRefString;
  if (isPlainObject(v)) {
    if (!('kind' in v)) return modelRefObject;
    if (v.kind === 'model_token') return modelTokenSchema;
    if (v.kind === 'zero') return zeroEmbeddingSchema as z.ZodType<TokenEmbeddingSource>;
    const hint = typeof v.kind === 'string' ? closestMatches(v.kind, ['model_token', 'zero'], 1)[0] : undefined;
    return {
      message: `token source kind must be \`model_token\` or \`zero\`, got ${describeValue(v.kind)}`,
      hint: hint ? `did you mean \`${hint}\`?` : undefined,
    };
  }
  return { message: `expected a model reference, {kind: model_token, ...} or {kind: zero}, got ${describeValue(v)}` };
});

const tokenEmbeddingSchema: z.ZodType<TokenEmbeddingConfig> = obj({
  source: opt(tokenEmbeddingSourceSchema),
  force: opt(z.boolean()),
}).transform((o) => {
  const out: TokenEmbeddingConfig = { force: o.force ?? false };
  if (o.source !== undefined) out.source = o.source;
  return out;
});

export const tokenizerConfigSchema: z.ZodType<TokenizerConfig> = obj({
  source: opt(tokenizerSourceSchema),
  tokens: opt(z.record(z.string(), tokenEmbeddingSchema)),
  pad_to_multiple_of: opt(z.number().int().min(1)),
}).transform((o) => {
  const out: TokenizerConfig = { source: o.source ?? 'union' };
  if (o.tokens !== undefined) out.tokens = o.tokens;
  if (o.pad_to_multiple_of !== undefined) out.pad_to_multiple_of = o.pad_to_multiple_of;
  return out;
});

// ---------------------------------------------------------------------------------------------
// Top level

export const DTYPES: readonly ConfigDtype[] = ['bfloat16', 'float16', 'float32'];

/** Names mergekit refuses, with the name meant (also after a `torch.` prefix); used for suggestions only. */
const DTYPE_ALIASES: Record<string, ConfigDtype> = Object.fromEntries(
  Object.entries({
    bf16: 'bfloat16',
    fp16: 'float16',
    f16: 'float16',
    half: 'float16',
    fp32: 'float32',
    f32: 'float32',
    float: 'float32',
  } as Record<string, ConfigDtype>).flatMap(([k, v]) => [[k, v], [`torch.${k}`, v]]),
);

/**
 * `dtype` / `out_dtype`: one of DTYPES. mergekit strips a leading `torch.` before looking the
 * name up, so `torch.bfloat16` is accepted too and read as `bfloat16`.
 */
function dtypeSchema(key: string): z.ZodType<ConfigDtype> {
  const plain = oneOf(DTYPES, key, DTYPE_ALIASES);
  return dispatch<ConfigDtype>((v) => {
    if (typeof v === 'string' && v.startsWith('torch.') && (DTYPES as readonly string[]).includes(v.slice(6))) {
      return z.string().transform((s) => s.slice(6) as ConfigDtype);
    }
    return plain;
  });
}

export const mergeConfigSchema: z.ZodType<MergeConfig> = obj({
  merge_method: z.string(),
  models: opt(z.array(inputModelSchema)),
  slices: opt(z.array(outputSliceSchema)),
  modules: opt(z.record(z.string(), outputModuleSchema)),
  base_model: opt(modelReferenceSchema),
  dtype: opt(dtypeSchema('dtype')),
  out_dtype: opt(dtypeSchema('out_dtype')),
  parameters: parameterMapSchema,
  tokenizer_source: opt(tokenizerSourceSchema),
  tokenizer: opt(tokenizerConfigSchema),
  chat_template: opt(z.string().min(1, { error: 'chat_template is empty' })),
});

/** Keys of the top-level mapping. */
export const TOP_LEVEL_KEYS = [
  'merge_method',
  'models',
  'slices',
  'modules',
  'base_model',
  'dtype',
  'out_dtype',
  'parameters',
  'tokenizer_source',
  'tokenizer',
  'chat_template',
] as const;
