/**
 * Models as JSON: `fromConfig(json)` builds any wrapper (or a bare attention stack) from
 * `{wrapper, ...options, attnLayers: {type, ...options}}`, accepting the reference's snake_case keys
 * as well as camelCase; `toConfig(model)` gives back the JSON that rebuilds it. The classes'
 * constructors check every option against the one rule table (src/utils/option-rules.ts); this
 * loader adds what only JSON has (snake_case keys, a key given twice, nested configs) and puts the
 * key path in front of their errors (`attnLayers.depth: expected a positive integer, got -1`).
 */
import { attentionDefaults } from '../attention/types.js';
import { feedForwardDefaults } from '../nn/feedforward.js';
import { attentionLayersDefaults } from '../layers/options.js';
import type { AttentionLayersOptions } from '../layers/options.js';
import {
  AttentionLayers,
  CrossAttender,
  Decoder,
  Encoder,
  PrefixDecoder,
} from '../layers/attention-layers.js';
import { TransformerWrapper, transformerWrapperDefaults } from '../wrappers/transformer-wrapper.js';
import { ViTransformerWrapper, viTransformerWrapperDefaults } from '../wrappers/vit.js';
import {
  ContinuousTransformerWrapper,
  continuousTransformerWrapperDefaults,
} from '../wrappers/continuous.js';
import { XValTransformerWrapper, xValTransformerWrapperDefaults } from '../wrappers/xval.js';
import { XTransformer, xTransformerDefaults, type XTransformerOptions } from '../wrappers/xtransformer.js';
import { NeoMLP, neoMLPDefaults, type NeoMLPOptions } from '../wrappers/neo-mlp.js';
import {
  MultiInputTransformerWrapper,
  multiInputTransformerWrapperDefaults,
  type MultiInputTransformerWrapperOptions,
} from '../wrappers/multi-input.js';
import {
  NonAutoregressiveWrapper,
  nonAutoregressiveWrapperDefaults,
  type NonAutoregressiveWrapperOptions,
} from '../generation/nonautoregressive-wrapper.js';
import {
  MAX_DIMENSION,
  camelKey,
  checkOptionValues,
  requireOption,
  snakeKey,
} from '../utils/option-rules.js';
import { OptionError, fmtValue, renamingOptions } from '../utils/errors.js';

export { MAX_DIMENSION, camelKey, snakeKey };

/** A JSON value. */
export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/** The JSON of an attention stack: `{type, dim, depth, heads, attnDimHead, ffGlu, ...}`. */
export interface LayersConfig {
  type: LayersType;
  [option: string]: JsonValue;
}

/** The JSON of a model: `{wrapper, ...options, attnLayers?}` (camelCase keys as `toConfig` writes them). */
export interface ModelConfig {
  wrapper: WrapperName;
  attnLayers?: LayersConfig;
  [option: string]: JsonValue | LayersConfig | undefined;
}

export const LAYERS_TYPES = [
  'Encoder',
  'Decoder',
  'CrossAttender',
  'PrefixDecoder',
  'AttentionLayers',
] as const;
export type LayersType = (typeof LAYERS_TYPES)[number];

export const WRAPPERS = [
  'TransformerWrapper',
  'ViTransformerWrapper',
  'ContinuousTransformerWrapper',
  'XValTransformerWrapper',
  'XTransformer',
  'MultiInputTransformerWrapper',
  'NeoMLP',
  'NonAutoregressiveWrapper',
  ...LAYERS_TYPES,
] as const;
export type WrapperName = (typeof WRAPPERS)[number];

/** Everything `fromConfig` can build. */
export type BuiltModel =
  | TransformerWrapper
  | ViTransformerWrapper
  | ContinuousTransformerWrapper
  | XValTransformerWrapper
  | XTransformer
  | NeoMLP
  | MultiInputTransformerWrapper
  | NonAutoregressiveWrapper
  | AttentionLayers;

function join(path: string, key: string): string {
  return path ? `${path}.${key}` : key;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Converts an object's keys to camelCase, rejecting a key given twice (`dim_head` and `dimHead`). */
function camelObject(o: Record<string, unknown>, path: string): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const from: Record<string, string> = {};
  for (const [k, v] of Object.entries(o)) {
    const c = camelKey(k);
    if (c in out) throw new OptionError(join(path, c), 'one spelling of the key', `both ${from[c]} and ${k}`);
    out[c] = v;
    from[c] = k;
  }
  return out;
}

/** Drops null entries (null means "the default"). */
function dropNulls(o: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== null && v !== undefined));
}

/** Runs a constructor, putting the key path `path` in front of the option errors it throws. */
function atPath<T>(path: string, fn: () => T): T {
  return renamingOptions((e) => e.in(path), fn);
}

function buildLayers(path: string, raw: unknown, typeOverride?: string): AttentionLayers {
  if (!isPlainObject(raw)) throw OptionError.of(path, 'an object {type, dim, depth, ...}', raw);
  const o = camelObject(raw, path);
  const type = typeOverride ?? o.type;
  delete o.type;
  if (typeof type !== 'string' || !(LAYERS_TYPES as readonly string[]).includes(type)) {
    throw OptionError.of(join(path, 'type'), `one of ${LAYERS_TYPES.join(', ')}`, type);
  }
  const t = type as LayersType;
  const opts = o as AttentionLayersOptions;
  return atPath(path, () => {
    switch (t) {
      case 'Encoder':
        return new Encoder(opts);
      case 'Decoder':
        return new Decoder(opts);
      case 'CrossAttender':
        return new CrossAttender(opts);
      case 'PrefixDecoder':
        return new PrefixDecoder(opts);
      default:
        return new AttentionLayers(opts);
    }
  });
}

/** Checks a wrapper's own options against its defaults; returns them without nulls. */
function wrapperOptions(
  o: Record<string, unknown>,
  defaults: Record<string, unknown>,
  requiredKeys: string[],
  wrapper: string,
): Record<string, unknown> {
  checkOptionValues(o, defaults, wrapper);
  for (const k of requiredKeys) requireOption(o, k);
  return dropNulls(o);
}

/**
 * Builds a model from its JSON config. json: `{wrapper, ...options, attnLayers: {type, ...options}}`
 * (camelCase or snake_case keys); XTransformer takes flat `enc*` / `dec*` options; a bare stack is
 * `{wrapper: 'Encoder' | 'Decoder' | 'CrossAttender' | ..., ...options}`. Throws an Error naming the key
 * path on an unknown key, a wrong type or an out-of-range value.
 */
export function fromConfig(json: unknown): BuiltModel {
  const parsed = typeof json === 'string' ? parseJson(json) : json;
  if (!isPlainObject(parsed))
    throw new Error(`config: expected an object {wrapper, ...}, got ${fmtValue(parsed)}`);
  const o = camelObject(parsed, '');
  const wrapper = o.wrapper;
  delete o.wrapper;
  if (typeof wrapper !== 'string' || !(WRAPPERS as readonly string[]).includes(wrapper)) {
    throw OptionError.of('wrapper', `one of ${WRAPPERS.join(', ')}`, wrapper);
  }
  const w = wrapper as WrapperName;
  if ((LAYERS_TYPES as readonly string[]).includes(w)) {
    if ('attnLayers' in o)
      throw new OptionError('attnLayers', `none: ${w} takes its options at the top level`, 'an object');
    if ('type' in o && o.type !== w) throw OptionError.of('type', `${w} (the wrapper) or nothing`, o.type);
    return buildLayers('', o, w);
  }
  if (w === 'XTransformer') return buildXTransformer(o);
  if (w === 'NeoMLP') return buildNeoMLP(o);
  if (w === 'MultiInputTransformerWrapper') return buildMultiInput(o);
  if (w === 'NonAutoregressiveWrapper') return buildNonAutoregressive(o);

  const { attnLayers: rawLayers, ...rest } = o;
  // the wrapper's constructor checks its own options
  const opts = rest;
  if (rawLayers === undefined)
    throw OptionError.of('attnLayers', 'an object {type, dim, depth, ...}', undefined);
  const attnLayers = buildLayers('attnLayers', rawLayers);
  try {
    switch (w) {
      case 'TransformerWrapper':
        return new TransformerWrapper({ ...(opts as { numTokens: number; maxSeqLen: number }), attnLayers });
      case 'ViTransformerWrapper':
        return new ViTransformerWrapper({
          ...(opts as { imageSize: number; patchSize: number }),
          attnLayers,
        });
      case 'ContinuousTransformerWrapper':
        return new ContinuousTransformerWrapper({ ...(opts as { maxSeqLen: number }), attnLayers });
      default:
        return new XValTransformerWrapper({
          ...(opts as { numTokens: number; maxSeqLen: number; numericalTokenId: number }),
          attnLayers,
        });
    }
  } catch (e) {
    attnLayers.dispose();
    throw e;
  }
}

function parseJson(s: string): unknown {
  try {
    return JSON.parse(s);
  } catch (e) {
    throw new Error(`config: not valid JSON (${(e as Error).message})`, { cause: e });
  }
}

function buildXTransformer(o: Record<string, unknown>): XTransformer {
  return new XTransformer(o as unknown as XTransformerOptions);
}

/** MultiInputTransformerWrapper: `numTokens` is an object of vocabulary sizes by input name. */
function buildMultiInput(o: Record<string, unknown>): MultiInputTransformerWrapper {
  const { attnLayers: rawLayers, ...opts } = o;
  if (rawLayers === undefined)
    throw OptionError.of('attnLayers', 'an object {type, dim, depth, ...}', undefined);
  const attnLayers = buildLayers('attnLayers', rawLayers);
  try {
    // the wrapper's constructor checks its own options
    return new MultiInputTransformerWrapper({ ...opts, attnLayers } as MultiInputTransformerWrapperOptions);
  } catch (e) {
    attnLayers.dispose();
    throw e;
  }
}

/** A TransformerWrapper given as a nested config (`net`, `tokenCritic`), errors prefixed with its key. */
function buildNested(key: string, raw: unknown): TransformerWrapper {
  if (!isPlainObject(raw))
    throw OptionError.of(key, 'a TransformerWrapper config {wrapper, numTokens, ...}', raw);
  const m = atPath(key, () => fromConfig(raw));
  if (!(m instanceof TransformerWrapper)) {
    m.dispose();
    throw OptionError.of(`${key}.wrapper`, 'TransformerWrapper', raw.wrapper);
  }
  return m;
}

/**
 * NonAutoregressiveWrapper: its own options, `net` (a TransformerWrapper config) and optionally
 * `tokenCritic` (another, with logitsDim 1).
 */
function buildNonAutoregressive(o: Record<string, unknown>): NonAutoregressiveWrapper {
  const { net: rawNet, tokenCritic: rawCritic, ...rest } = o;
  const { tokenCritic: _none, ...defaults } = nonAutoregressiveWrapperDefaults;
  const opts = wrapperOptions(
    rest,
    defaults as Record<string, unknown>,
    ['maskId'],
    'NonAutoregressiveWrapper',
  );
  const net = buildNested('net', rawNet);
  let critic: TransformerWrapper | null = null;
  try {
    if (rawCritic !== undefined && rawCritic !== null) critic = buildNested('tokenCritic', rawCritic);
    return new NonAutoregressiveWrapper(net, {
      ...(opts as Partial<NonAutoregressiveWrapperOptions> & { maskId: number }),
      tokenCritic: critic,
    });
  } catch (e) {
    net.dispose();
    critic?.dispose();
    throw e;
  }
}

/** NeoMLP: its own options, and `encoderKwargs` as the options of an Encoder (without dim and depth). */
function buildNeoMLP(o: Record<string, unknown>): NeoMLP {
  const kw = o.encoderKwargs;
  if (isPlainObject(kw)) o.encoderKwargs = camelObject(kw, 'encoderKwargs');
  return new NeoMLP(o as unknown as NeoMLPOptions);
}

function sameValue(a: unknown, b: unknown): boolean {
  if (Array.isArray(a) || Array.isArray(b)) {
    return (
      Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((x, i) => sameValue(x, b[i]))
    );
  }
  if (isPlainObject(a) && isPlainObject(b)) {
    const ka = Object.keys(a);
    return ka.length === Object.keys(b).length && ka.every((k) => k in b && sameValue(a[k], b[k]));
  }
  return a === b;
}

/** The entries of `o` that differ from `defaults` (always keeping `keep`), as JSON. */
function nonDefault(
  o: Record<string, unknown>,
  defaults: Record<string, unknown>,
  keep: readonly string[] = [],
): Record<string, JsonValue> {
  const out: Record<string, JsonValue> = {};
  for (const [k, v] of Object.entries(o)) {
    if (v === undefined) continue;
    if (!keep.includes(k) && k in defaults && sameValue(v, defaults[k])) continue;
    out[k] = (Array.isArray(v) ? [...v] : isPlainObject(v) ? { ...v } : v) as JsonValue;
  }
  return out;
}

function layersType(l: AttentionLayers): LayersType {
  if (l instanceof Encoder) return 'Encoder';
  if (l instanceof Decoder) return 'Decoder';
  if (l instanceof CrossAttender) return 'CrossAttender';
  if (l instanceof PrefixDecoder) return 'PrefixDecoder';
  return 'AttentionLayers';
}

function prefixKeys(prefix: string, o: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(
    Object.entries(o).map(([k, v]) => [prefix + k[0]!.toUpperCase() + k.slice(1), v]),
  );
}

/** The options of an attention stack (without `type`), camelCase, defaults left out. */
function layersOptions(l: AttentionLayers, type: LayersType): Record<string, JsonValue> {
  const own = { ...(l.options as unknown as Record<string, unknown>) };
  if (type === 'Encoder' || type === 'Decoder' || type === 'PrefixDecoder') delete own.causal;
  if (type === 'CrossAttender') {
    delete own.crossAttend;
    delete own.onlyCross;
  }
  const attn = { ...(l.attnOptions as Record<string, unknown>) };
  const ff = { ...(l.ffOptions as Record<string, unknown>) };
  if (own.zeroInitBranchOutput) {
    // the stack passes zeroInitOutput to its branches itself
    delete attn.zeroInitOutput;
    delete ff.zeroInitOutput;
  }
  const ad = attentionDefaults as unknown as Record<string, unknown>;
  for (const [prefix, o] of [
    ['attn', attn],
    ['crossAttn', l.crossAttnOptions as Record<string, unknown>],
  ] as const)
    for (const key of ['customAttnFn', 'hybridModule'])
      if (o[key] != null && !isPlainObject(o[key]))
        throw new Error(
          `toConfig: ${prefix}${key[0]!.toUpperCase()}${key.slice(1)} is code (a function or module), which has no JSON form${key === 'hybridModule' ? " (a spec {type: 'gru', ...} has)" : ''}`,
        );
  return {
    ...nonDefault(own, attentionLayersDefaults as unknown as Record<string, unknown>, ['dim']),
    ...nonDefault(prefixKeys('attn', attn), prefixKeys('attn', ad)),
    ...nonDefault(
      prefixKeys('crossAttn', l.crossAttnOptions as Record<string, unknown>),
      prefixKeys('crossAttn', ad),
    ),
    ...nonDefault(
      prefixKeys('ff', ff),
      prefixKeys('ff', feedForwardDefaults as unknown as Record<string, unknown>),
    ),
  };
}

/**
 * The JSON config that rebuilds `model` with `fromConfig` (camelCase keys, default values left out):
 * the same options, parameter names and shapes; copy the weights with loadStateDict(stateDict()).
 */
export function toConfig(model: BuiltModel): ModelConfig {
  if (model instanceof AttentionLayers) {
    const type = layersType(model);
    return { wrapper: type, ...layersOptions(model, type) };
  }
  const layers = (l: unknown): LayersConfig => {
    if (!(l instanceof AttentionLayers)) {
      throw new Error(
        'toConfig: attnLayers is not an AttentionLayers (Encoder, Decoder, ...), so it has no config',
      );
    }
    const type = layersType(l);
    return { type, ...layersOptions(l, type) };
  };
  // wrappers of one attention stack: their options that differ from the defaults (and the ones
  // they cannot do without), and the stack
  const single: [unknown, string, object, readonly string[]][] = [
    [TransformerWrapper, 'TransformerWrapper', transformerWrapperDefaults, ['numTokens', 'maxSeqLen']],
    [ViTransformerWrapper, 'ViTransformerWrapper', viTransformerWrapperDefaults, ['imageSize', 'patchSize']],
    [
      ContinuousTransformerWrapper,
      'ContinuousTransformerWrapper',
      continuousTransformerWrapperDefaults,
      ['maxSeqLen'],
    ],
    [
      XValTransformerWrapper,
      'XValTransformerWrapper',
      xValTransformerWrapperDefaults,
      ['numTokens', 'maxSeqLen', 'numericalTokenId'],
    ],
    [
      MultiInputTransformerWrapper,
      'MultiInputTransformerWrapper',
      multiInputTransformerWrapperDefaults,
      ['numTokens', 'maxSeqLen'],
    ],
  ];
  for (const [cls, wrapper, defaults, keep] of single) {
    if (!(model instanceof (cls as new (...args: never[]) => unknown))) continue;
    const m = model as unknown as { options: object; attnLayers: unknown };
    return {
      wrapper,
      ...nonDefault(m.options as Record<string, unknown>, defaults as Record<string, unknown>, keep),
      attnLayers: layers(m.attnLayers),
    } as ModelConfig;
  }
  if (model instanceof NonAutoregressiveWrapper) {
    const { tokenCritic, schedule, ...own } = model.options;
    if (typeof schedule === 'function')
      throw new Error('schedule: a schedule function has no JSON config (use linear or cosine)');
    const { tokenCritic: _none, ...defaults } = nonAutoregressiveWrapperDefaults;
    return {
      wrapper: 'NonAutoregressiveWrapper',
      ...nonDefault({ ...own, schedule }, defaults as Record<string, unknown>, ['maskId']),
      net: toConfig(model.net) as unknown as JsonValue,
      ...(tokenCritic ? { tokenCritic: toConfig(tokenCritic) as unknown as JsonValue } : {}),
    };
  }
  if (model instanceof NeoMLP) {
    return {
      wrapper: 'NeoMLP',
      ...nonDefault(
        model.options as unknown as Record<string, unknown>,
        neoMLPDefaults as unknown as Record<string, unknown>,
        ['dimIn', 'dimHidden', 'dimOut', 'dimModel', 'depth'],
      ),
    };
  }
  if (model instanceof XTransformer) {
    return {
      wrapper: 'XTransformer',
      ...nonDefault(
        model.options as unknown as Record<string, unknown>,
        xTransformerDefaults as unknown as Record<string, unknown>,
        ['dim'],
      ),
      ...nonDefault(prefixKeys('enc', model.encOptions), {}),
      ...nonDefault(prefixKeys('dec', model.decOptions), {}),
    };
  }
  throw new Error(
    `model: expected a model built by fromConfig (a wrapper or an attention stack), got ${fmtValue((model as object)?.constructor?.name)}`,
  );
}
