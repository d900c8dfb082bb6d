/**
 * Models as JSON: `fromConfig(json)` builds any wrapper (or a bare attention stack) from
 * `{wrapper, ...options, attnLayers: {type, ...options}}`, accepting the reference's snake_case keys
 * as well as camelCase; `toConfig(model)` gives back the JSON that rebuilds it. Every key is checked
 * against the classes' defaults objects, and every error names the key path
 * (`attnLayers.depth: expected a positive integer, got -1`).
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
import {
  DECODER_WRAPPER_KEYS,
  ENCODER_WRAPPER_KEYS,
  XTransformer,
  splitEncDec,
  xTransformerDefaults,
  type XTransformerOptions,
} from '../wrappers/xtransformer.js';
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
import { RULES, ruleFor } from './config-rules.js';

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

/** `attn_dim_head` -> `attnDimHead`; camelCase keys are unchanged. */
export function camelKey(key: string): string {
  return key.replace(/_+([a-zA-Z0-9])/g, (_m, c: string) => c.toUpperCase());
}

/** camelCase -> the reference's snake_case (`attnDimHead` -> `attn_dim_head`). */
export function snakeKey(key: string): string {
  return key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

function fmtValue(v: unknown): string {
  if (v === undefined) return 'undefined';
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

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
    if (c in out) throw new Error(`${join(path, c)}: given twice (as ${from[c]} and ${k})`);
    out[c] = v;
    from[c] = k;
  }
  return out;
}

/**
 * Checks one option against the defaults object that defines it: unknown keys, wrong types and
 * out-of-range values throw with the key path. Null means "the default" where the default is null.
 */
function checkOption(
  path: string,
  key: string,
  value: unknown,
  defaults: Record<string, unknown>,
  ruleName = key,
): void {
  if (!(key in defaults)) throw new Error(`${join(path, key)}: unknown option`);
  const def = defaults[key];
  if (value === null) {
    if (def === null) return;
    const rule = ruleFor(ruleName, def);
    throw new Error(`${join(path, key)}: expected ${rule ? rule.expected : 'a value'}, got null`);
  }
  const rule = ruleFor(ruleName, def);
  if (rule && !rule.test(value))
    throw new Error(`${join(path, key)}: expected ${rule.expected}, got ${fmtValue(value)}`);
  // an object is accepted only where the default is one (e.g. dataDependentAlibiKwargs); its class checks it
  if (!rule && typeof value === 'object' && !Array.isArray(value) && !isPlainObject(def)) {
    throw new Error(`${join(path, key)}: expected a number, boolean, string or list, got ${fmtValue(value)}`);
  }
}

function required(path: string, key: string, o: Record<string, unknown>): void {
  if (o[key] === undefined || o[key] === null) {
    const rule = ruleFor(key, undefined);
    throw new Error(
      `${join(path, key)}: expected ${rule ? rule.expected : 'a value'}, got ${fmtValue(o[key])}`,
    );
  }
}

/** Drops null entries (null means "the default"). */
function dropNulls(o: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== null && v !== undefined));
}

const PREFIXES: [string, Record<string, unknown>][] = [
  ['crossAttn', attentionDefaults as unknown as Record<string, unknown>],
  ['attn', attentionDefaults as unknown as Record<string, unknown>],
  ['ff', feedForwardDefaults as unknown as Record<string, unknown>],
];

/** Checks the options of an attention stack (own, `attn*`, `crossAttn*`, `ff*`); `path` prefixes errors. */
function checkLayersOptions(
  path: string,
  o: Record<string, unknown>,
  type: LayersType,
  keyPrefix = '',
): void {
  const name = (k: string): string => (keyPrefix ? keyPrefix + k[0]!.toUpperCase() + k.slice(1) : k);
  const own = attentionLayersDefaults as unknown as Record<string, unknown>;
  for (const [k, v] of Object.entries(o)) {
    if ((type === 'Encoder' || type === 'Decoder' || type === 'PrefixDecoder') && k === 'causal') {
      throw new Error(
        `${join(path, name(k))}: cannot set causality on ${type === 'Encoder' ? 'an' : 'a'} ${type}`,
      );
    }
    if (type === 'CrossAttender' && (k === 'crossAttend' || k === 'onlyCross')) {
      throw new Error(`${join(path, name(k))}: always true on a CrossAttender`);
    }
    if (k in own) {
      checkOption(path, name(k), v, { [name(k)]: own[k] }, k);
      continue;
    }
    const prefixed = PREFIXES.find(([p]) => new RegExp(`^${p}[A-Z]`).test(k));
    if (!prefixed) throw new Error(`${join(path, name(k))}: unknown option of ${type}`);
    const [p, defaults] = prefixed;
    const inner = k[p.length]!.toLowerCase() + k.slice(p.length + 1);
    if (!(inner in defaults)) {
      const what = p === 'ff' ? 'feedforward' : 'attention';
      throw new Error(`${join(path, name(k))}: unknown ${what} option ${inner}`);
    }
    checkOption(path, name(k), v, { [name(k)]: defaults[inner] }, inner);
  }
}

/** Largest size of one tensor dimension that a definition may ask for (TF.js shapes are int32). */
export const MAX_DIMENSION = 2 ** 31 - 1;

/**
 * The feedforward's hidden size is floor(dim * mult): a float factor can make it zero or too large
 * to allocate, which no single-option rule sees. `key` is the option's name in the definition.
 */
function checkFeedForwardSize(path: string, key: string, dim: unknown, mult: unknown): void {
  if (typeof dim !== 'number' || typeof mult !== 'number') return;
  const inner = Math.floor(dim * mult);
  if (!(inner >= 1 && inner <= MAX_DIMENSION)) {
    throw new Error(
      `${join(path, key)}: expected a factor that makes the feedforward size floor(dim * ${key}) an integer in [1, ${MAX_DIMENSION}] (dim is ${dim}), got ${fmtValue(mult)}`,
    );
  }
}

/** Prefixes a constructor's `option: message` error with the key path. */
function withPath<T>(path: string, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    const err = e as Error;
    if (path && /^[a-zA-Z][A-Za-z0-9]*(\.[A-Za-z0-9]+)*:/.test(err.message)) {
      throw new Error(`${path}.${err.message}`, { cause: e });
    }
    throw e;
  }
}

function buildLayers(path: string, raw: unknown, typeOverride?: string): AttentionLayers {
  if (!isPlainObject(raw))
    throw new Error(`${path}: expected an object {type, dim, depth, ...}, got ${fmtValue(raw)}`);
  const o = camelObject(raw, path);
  const type = typeOverride ?? o.type;
  delete o.type;
  if (typeof type !== 'string' || !(LAYERS_TYPES as readonly string[]).includes(type)) {
    throw new Error(
      `${join(path, 'type')}: expected one of ${LAYERS_TYPES.join(', ')}, got ${fmtValue(type)}`,
    );
  }
  const t = type as LayersType;
  checkLayersOptions(path, o, t);
  required(path, 'dim', o);
  checkFeedForwardSize(path, 'ffMult', o.dim, o.ffMult ?? feedForwardDefaults.mult);
  const opts = dropNulls(o) as AttentionLayersOptions;
  return withPath(path, () => {
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
  for (const [k, v] of Object.entries(o)) {
    if (!(k in defaults)) throw new Error(`${k}: unknown option of ${wrapper}`);
    checkOption('', k, v, defaults);
  }
  for (const k of requiredKeys) required('', k, o);
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
    throw new Error(`wrapper: expected one of ${WRAPPERS.join(', ')}, got ${fmtValue(wrapper)}`);
  }
  const w = wrapper as WrapperName;
  if ((LAYERS_TYPES as readonly string[]).includes(w)) {
    if ('attnLayers' in o)
      throw new Error(`attnLayers: unknown option of ${w} (its options go at the top level)`);
    if ('type' in o && o.type !== w)
      throw new Error(`type: expected ${w} (the wrapper) or nothing, got ${fmtValue(o.type)}`);
    return buildLayers('', o, w);
  }
  if (w === 'XTransformer') return buildXTransformer(o);
  if (w === 'NeoMLP') return buildNeoMLP(o);
  if (w === 'MultiInputTransformerWrapper') return buildMultiInput(o);
  if (w === 'NonAutoregressiveWrapper') return buildNonAutoregressive(o);

  const { attnLayers: rawLayers, ...rest } = o;
  const defaults: Record<string, Record<string, unknown>> = {
    TransformerWrapper: transformerWrapperDefaults as unknown as Record<string, unknown>,
    ViTransformerWrapper: viTransformerWrapperDefaults,
    ContinuousTransformerWrapper: continuousTransformerWrapperDefaults,
    XValTransformerWrapper: xValTransformerWrapperDefaults,
  };
  const requiredKeys: Record<string, string[]> = {
    TransformerWrapper: ['numTokens', 'maxSeqLen'],
    ViTransformerWrapper: ['imageSize', 'patchSize'],
    ContinuousTransformerWrapper: ['maxSeqLen'],
    XValTransformerWrapper: ['numTokens', 'maxSeqLen', 'numericalTokenId'],
  };
  const opts = wrapperOptions(rest, defaults[w]!, requiredKeys[w]!, w);
  if (rawLayers === undefined)
    throw new Error(`attnLayers: expected an object {type, dim, depth, ...}, got undefined`);
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
  const [enc, dec, own] = splitEncDec(o);
  const ownDefaults = xTransformerDefaults as unknown as Record<string, unknown>;
  for (const [k, v] of Object.entries(own)) {
    if (!(k in ownDefaults))
      throw new Error(
        `${k}: unknown option of XTransformer (encoder / decoder options take an enc / dec prefix)`,
      );
    checkOption('', k, v, ownDefaults);
  }
  required('', 'dim', own);
  const wrapDefaults = transformerWrapperDefaults as unknown as Record<string, unknown>;
  const sides: [string, Record<string, unknown>, readonly string[]][] = [
    ['enc', enc, ENCODER_WRAPPER_KEYS],
    ['dec', dec, DECODER_WRAPPER_KEYS],
  ];
  for (const [prefix, side, wrapKeys] of sides) {
    const layerOpts: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(side)) {
      const full = prefix + k[0]!.toUpperCase() + k.slice(1);
      if (k === 'dim') throw new Error(`${full}: the dimension of both stacks is set with dim`);
      if (wrapKeys.includes(k)) checkOption('', full, v, { [full]: wrapDefaults[k] }, k);
      else layerOpts[k] = v;
    }
    checkLayersOptions('', layerOpts, prefix === 'enc' ? 'Encoder' : 'Decoder', prefix);
    checkFeedForwardSize('', `${prefix}FfMult`, own.dim, layerOpts.ffMult ?? feedForwardDefaults.mult);
    if (prefix === 'dec' && 'crossAttend' in layerOpts)
      throw new Error('decCrossAttend: always true on the decoder');
    for (const k of ['numTokens', 'maxSeqLen']) {
      if (side[k] === undefined || side[k] === null)
        required('', prefix + k[0]!.toUpperCase() + k.slice(1), {});
    }
  }
  return new XTransformer(dropNulls(o) as XTransformerOptions);
}

/** MultiInputTransformerWrapper: `numTokens` is an object of vocabulary sizes by input name. */
function buildMultiInput(o: Record<string, unknown>): MultiInputTransformerWrapper {
  const { attnLayers: rawLayers, numTokens, ...rest } = o;
  if (!RULES.countsByName.test(numTokens) || Object.keys(numTokens as object).length === 0)
    throw new Error(
      `numTokens: expected an object of positive integers by input name (at least one), got ${fmtValue(numTokens)}`,
    );
  const defaults = multiInputTransformerWrapperDefaults as unknown as Record<string, unknown>;
  const opts = wrapperOptions(rest, defaults, ['maxSeqLen'], 'MultiInputTransformerWrapper');
  if (rawLayers === undefined)
    throw new Error(`attnLayers: expected an object {type, dim, depth, ...}, got undefined`);
  const attnLayers = buildLayers('attnLayers', rawLayers);
  try {
    return new MultiInputTransformerWrapper({
      ...(opts as { maxSeqLen: number }),
      numTokens: numTokens as Record<string, number>,
      attnLayers,
    } as MultiInputTransformerWrapperOptions);
  } catch (e) {
    attnLayers.dispose();
    throw e;
  }
}

/** A TransformerWrapper given as a nested config (`net`, `tokenCritic`), errors prefixed with its key. */
function buildNested(key: string, raw: unknown): TransformerWrapper {
  if (!isPlainObject(raw))
    throw new Error(
      `${key}: expected a TransformerWrapper config {wrapper, numTokens, ...}, got ${fmtValue(raw)}`,
    );
  const m = withPath(key, () => fromConfig(raw));
  if (!(m instanceof TransformerWrapper)) {
    m.dispose();
    throw new Error(`${key}.wrapper: expected TransformerWrapper, got ${fmtValue(raw.wrapper)}`);
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
  const defaults = neoMLPDefaults as unknown as Record<string, unknown>;
  const opts = wrapperOptions(o, defaults, ['dimIn', 'dimHidden', 'dimOut', 'dimModel', 'depth'], 'NeoMLP');
  if (opts.encoderKwargs !== undefined) {
    if (!isPlainObject(opts.encoderKwargs))
      throw new Error(
        `encoderKwargs: expected an object of Encoder options, got ${fmtValue(opts.encoderKwargs)}`,
      );
    const kw = camelObject(opts.encoderKwargs as Record<string, unknown>, 'encoderKwargs');
    for (const k of ['dim', 'depth'])
      if (k in kw) throw new Error(`encoderKwargs.${k}: set by NeoMLP (dimModel, depth)`);
    checkLayersOptions('encoderKwargs', kw, 'Encoder');
    checkFeedForwardSize('encoderKwargs', 'ffMult', opts.dimModel, kw.ffMult ?? feedForwardDefaults.mult);
    opts.encoderKwargs = dropNulls(kw);
  }
  return new NeoMLP(opts as unknown as NeoMLPOptions);
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
  if (model instanceof TransformerWrapper) {
    return {
      wrapper: 'TransformerWrapper',
      ...nonDefault(
        model.options as unknown as Record<string, unknown>,
        transformerWrapperDefaults as unknown as Record<string, unknown>,
        ['numTokens', 'maxSeqLen'],
      ),
      attnLayers: layers(model.attnLayers),
    };
  }
  if (model instanceof ViTransformerWrapper) {
    return {
      wrapper: 'ViTransformerWrapper',
      ...nonDefault(model.options, viTransformerWrapperDefaults, ['imageSize', 'patchSize']),
      attnLayers: layers(model.attnLayers),
    };
  }
  if (model instanceof ContinuousTransformerWrapper) {
    return {
      wrapper: 'ContinuousTransformerWrapper',
      ...nonDefault(model.options, continuousTransformerWrapperDefaults, ['maxSeqLen']),
      attnLayers: layers(model.attnLayers),
    };
  }
  if (model instanceof XValTransformerWrapper) {
    return {
      wrapper: 'XValTransformerWrapper',
      ...nonDefault(model.options, xValTransformerWrapperDefaults, [
        'numTokens',
        'maxSeqLen',
        'numericalTokenId',
      ]),
      attnLayers: layers(model.attnLayers),
    };
  }
  if (model instanceof MultiInputTransformerWrapper) {
    return {
      wrapper: 'MultiInputTransformerWrapper',
      ...nonDefault(
        model.options as unknown as Record<string, unknown>,
        multiInputTransformerWrapperDefaults as unknown as Record<string, unknown>,
        ['numTokens', 'maxSeqLen'],
      ),
      attnLayers: layers(model.attnLayers),
    };
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
