/**
 * The one table of option rules, used by the library's constructors (Attention, FeedForward,
 * AttentionLayers, the wrappers) and so by the JSON config loader, which builds through them:
 * what a value must be for an option, by option name. Defaults objects give the set of valid keys
 * and, for boolean / string defaults, the type; these rules add ranges (positive integers,
 * probabilities, lists) and the type of options whose default is null.
 */
import { OptionError, fmtValue } from './errors.js';

/** A check: `test(v)` is true when `v` is acceptable; `expected` says what is ("a positive integer"). */
export type Rule = { expected: string; test: (v: unknown) => boolean };

// beyond 2^53 a number is no longer an exact integer (and as a size it could never be allocated)
const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v);
const isNum = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v);

export const RULES = {
  posInt: { expected: 'a positive integer', test: (v: unknown) => isInt(v) && v > 0 },
  nonNegInt: { expected: 'a non-negative integer', test: (v: unknown) => isInt(v) && v >= 0 },
  int: { expected: 'an integer', test: isInt },
  number: { expected: 'a finite number', test: isNum },
  posNumber: { expected: 'a positive number', test: (v: unknown) => isNum(v) && v > 0 },
  prob: { expected: 'a number in [0, 1)', test: (v: unknown) => isNum(v) && v >= 0 && v < 1 },
  probability: { expected: 'a number in [0, 1]', test: (v: unknown) => isNum(v) && v >= 0 && v <= 1 },
  unitInterval: { expected: 'a number in (0, 1]', test: (v: unknown) => isNum(v) && v > 0 && v <= 1 },
  bool: { expected: 'a boolean', test: (v: unknown) => typeof v === 'boolean' },
  string: { expected: 'a string', test: (v: unknown) => typeof v === 'string' },
  nonNegIntOrList: {
    expected: 'a non-negative integer or a list of them',
    test: (v: unknown) => (Array.isArray(v) ? v.every((x) => isInt(x) && x >= 0) : isInt(v) && v >= 0),
  },
  probOrList: {
    expected: 'a number in [0, 1) or a list of them',
    test: (v: unknown) =>
      Array.isArray(v) ? v.every((x) => isNum(x) && x >= 0 && x < 1) : isNum(v) && v >= 0 && v < 1,
  },
  layerTypes: {
    expected: "a non-empty list of 'a', 'c', 'f'",
    test: (v: unknown) =>
      Array.isArray(v) && v.length > 0 && v.every((x) => x === 'a' || x === 'c' || x === 'f'),
  },
  countsByName: {
    expected: 'an object of positive integers by name',
    test: (v: unknown) =>
      typeof v === 'object' &&
      v !== null &&
      !Array.isArray(v) &&
      Object.values(v).every((x) => isInt(x) && x > 0),
  },
  hybridModule: {
    expected:
      "a spec {type: 'gru', hiddenSize?, numLayers?, bias?, bidirectional?}, a factory (dim) => module, or a module with forward and clone",
    test: (v: unknown) =>
      typeof v === 'function' || (typeof v === 'object' && v !== null && !Array.isArray(v)),
  },
  functionOrNull: {
    expected: 'a function or null',
    test: (v: unknown) => v === null || typeof v === 'function',
  },
  nonEmptyString: {
    expected: 'a non-empty string',
    test: (v: unknown) => typeof v === 'string' && v.length > 0,
  },
  object: {
    expected: 'an object',
    test: (v: unknown) => typeof v === 'object' && v !== null && !Array.isArray(v),
  },
  indexList: {
    expected: 'a non-empty list of non-negative integers',
    test: (v: unknown) => Array.isArray(v) && v.length > 0 && v.every((x) => isInt(x) && x >= 0),
  },
} satisfies Record<string, Rule>;

/** Rules by option name (unprefixed, camelCase), wherever the option appears. */
const BY_NAME: Record<string, Rule> = {
  dim: RULES.posInt,
  depth: RULES.posInt,
  heads: RULES.posInt,
  dimHead: RULES.posInt,
  numTokens: RULES.posInt,
  maxSeqLen: RULES.nonNegInt,
  maxMemLen: RULES.nonNegInt,
  shiftMemDown: RULES.nonNegInt,
  embDim: RULES.posInt,
  logitsDim: RULES.posInt,
  numMemoryTokens: RULES.nonNegInt,
  numClsTokens: RULES.posInt,
  numOutputHeads: RULES.posInt,
  mixtureOfSoftmaxK: RULES.posInt,
  memoryTokensInterspersedEvery: RULES.posInt,
  trainMaxRecycleSteps: RULES.posInt,
  embedNumTokens: RULES.countsByName,
  embFracGradient: RULES.unitInterval,
  imageSize: RULES.posInt,
  patchSize: RULES.posInt,
  channels: RULES.posInt,
  numClasses: RULES.posInt,
  numRegisterTokens: RULES.nonNegInt,
  dimIn: RULES.posInt,
  dimOut: RULES.posInt,
  dimHidden: RULES.posInt,
  // non-autoregressive training
  maskId: RULES.nonNegInt,
  steps: RULES.posInt,
  selfCondTrainProb: RULES.probability,
  noReplaceProb: RULES.probability,
  randomTokenProb: RULES.probability,
  dimModel: RULES.posInt,
  numericalTokenId: RULES.nonNegInt,
  ignoreIndex: RULES.int,
  padValue: RULES.int,
  // attention layers
  alibiNumHeads: RULES.posInt,
  relPosNumBuckets: RULES.posInt,
  relPosMaxDistance: RULES.posInt,
  dynamicPosBiasMlpDepth: RULES.posInt,
  rotaryEmbDim: RULES.posInt,
  rotaryInterpolationFactor: RULES.posNumber,
  rotaryXposScaleBase: RULES.posNumber,
  rotaryBaseRescaleFactor: RULES.posNumber,
  customLayers: RULES.layerTypes,
  layersExecuteOrder: RULES.indexList,
  sandwichCoef: RULES.posInt,
  parRatio: RULES.posInt,
  shiftTokens: RULES.nonNegIntOrList,
  layerDropout: RULES.probOrList,
  resiDualScale: RULES.unitInterval,
  disableAbsPosEmb: RULES.bool,
  numResidualStreams: RULES.posInt,
  dimCondition: RULES.posInt,
  adaptiveConditionMlpExpansion: RULES.posInt,
  softclampOutputValue: RULES.posNumber,
  relPosKwargs: RULES.object,
  residualFnKwargs: RULES.object,
  // attention
  dimContext: RULES.posInt,
  sparseTopk: RULES.posInt,
  numMemKv: RULES.nonNegInt,
  maxAttendPast: RULES.nonNegInt,
  rotateNumHeads: RULES.posInt,
  customAttnFn: RULES.functionOrNull,
  dataDependentAlibiKwargs: RULES.object,
  dataDependentAlibiPerRowDimHead: RULES.posInt,
  copeMaxPos: RULES.posInt,
  laserSoftclampValue: RULES.posNumber,
  qkNormGroups: RULES.posInt,
  qkNormScale: RULES.number,
  kvHeads: RULES.posInt,
  valueDimHead: RULES.posInt,
  logitSoftclampValue: RULES.posNumber,
  dimLatentQ: RULES.posInt,
  dimLatentKv: RULES.posInt,
  latentRopeSubheads: RULES.posInt,
  hybridModule: RULES.hybridModule,
  hybridMaskKwarg: RULES.nonEmptyString,
  hybridFoldAxialDim: RULES.posInt,
  // feedforward
  mult: RULES.posNumber,
};

/**
 * The rule of option `name` whose default is `def`: boolean / string defaults give their type, a
 * named rule gives ranges, names ending in `dropout` are probabilities, other numbers are numbers.
 * Null when anything JSON is accepted (the constructor checks it).
 */
export function ruleFor(name: string, def: unknown): Rule | null {
  if (typeof def === 'boolean') return RULES.bool;
  if (typeof def === 'string') return RULES.string;
  const named = BY_NAME[name];
  if (named) return named;
  if (/dropout$/i.test(name)) return RULES.prob;
  if (typeof def === 'number') return RULES.number;
  return null;
}

/** `attn_dim_head` -> `attnDimHead`; camelCase keys are unchanged. */
export function camelKey(key: string): string {
  return key.replace(/_+([a-zA-Z0-9])/g, (_m, c: string) => c.toUpperCase());
}

/** camelCase -> the reference's snake_case (`attnDimHead` -> `attn_dim_head`). */
export function snakeKey(key: string): string {
  return key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

/**
 * Checks the options `given` of `owner` against its defaults object and the rules: an unknown key,
 * a wrong type or an out-of-range value throws an OptionError naming the key. Undefined means "not
 * given"; null is accepted where the default is null (no value).
 */
export function checkOptionValues(given: object, defaults: object, owner: string): void {
  const defs = defaults as Record<string, unknown>;
  for (const [key, value] of Object.entries(given)) {
    if (value === undefined) continue;
    if (!(key in defs)) throw new OptionError(key, `an option of ${owner}`, 'an unknown option');
    const def = defs[key];
    if (value === null && def === null) continue;
    const rule = ruleFor(key, def);
    if (rule) {
      if (!rule.test(value)) throw OptionError.of(key, rule.expected, value);
    } else if (value === null || (typeof value === 'object' && !Array.isArray(value) && !isObject(def))) {
      // no rule: the default's kind (a list, an object) is what the constructor reads
      throw OptionError.of(key, 'a number, boolean, string or list', value);
    }
  }
}

/** Throws an OptionError unless option `key` of `given` has a value (not undefined or null). */
export function requireOption(given: object, key: string): void {
  const value = (given as Record<string, unknown>)[key];
  if (value === undefined || value === null)
    throw new OptionError(key, ruleFor(key, undefined)?.expected ?? 'a value', fmtValue(value));
}

function isObject(v: unknown): boolean {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Largest size of one tensor dimension that options may ask for (TF.js shapes are int32). */
export const MAX_DIMENSION = 2 ** 31 - 1;

/** A copy of `o` without its undefined entries (so they fall back to defaults). */
export function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
