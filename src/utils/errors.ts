import type * as tf from '@tensorflow/tfjs-core';

/** Formats a shape as `[2, 3, 4]` for error messages. */
export function fmtShape(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

/**
 * Checks a tensor's rank, dimensions (null = any) and optionally dtype, throwing an Error that names
 * the argument, what was expected and what came.
 */
export function checkTensor(
  name: string,
  t: tf.Tensor | undefined | null,
  expected: {
    shape?: readonly (number | null)[];
    rank?: number;
    dtype?: tf.DataType | readonly tf.DataType[];
    desc?: string;
  },
): asserts t is tf.Tensor {
  const desc = expected.desc ? ` (${expected.desc})` : '';
  if (t === undefined || t === null) throw new Error(`${name}: expected a tensor${desc}, got ${String(t)}`);
  if (expected.rank !== undefined && t.rank !== expected.rank) {
    throw new Error(
      `${name}: expected a tensor of rank ${expected.rank}${desc}, got shape ${fmtShape(t.shape)}`,
    );
  }
  if (expected.shape) {
    const s = expected.shape;
    const ok = s.length === t.rank && s.every((d, i) => d === null || d === t.shape[i]);
    if (!ok) {
      const want = `[${s.map((d) => (d === null ? '*' : String(d))).join(', ')}]`;
      throw new Error(`${name}: expected shape ${want}${desc}, got ${fmtShape(t.shape)}`);
    }
  }
  if (expected.dtype) {
    const allowed = Array.isArray(expected.dtype) ? expected.dtype : [expected.dtype];
    if (!allowed.includes(t.dtype)) {
      throw new Error(`${name}: expected dtype ${allowed.join(' or ')}, got ${t.dtype}`);
    }
  }
}

/** Formats a value for an error message: strings quoted, numbers as written (NaN, Infinity), objects as JSON. */
export function fmtValue(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean' || v === null || v === undefined) return String(v);
  if (typeof v === 'function') return 'a function';
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}

/**
 * A bad option: `path` names it (`depth`, `attnDimHead`, `attnLayers.depth`), `expected` says what it
 * must be and `got` what came; the message reads `path: expected X, got Y`. A caller that knows the
 * option under another name re-throws it with `in` (a key path) or `prefixed` (a camelCase prefix),
 * so no message text is ever rewritten.
 */
export class OptionError extends Error {
  constructor(
    readonly path: string,
    readonly expected: string,
    readonly got: string | null,
  ) {
    super(`${path}: expected ${expected}${got === null ? '' : `, got ${got}`}`);
    this.name = 'OptionError';
  }

  /** `path: expected X, got <value>`, the value formatted as messages show values. */
  static of(path: string, expected: string, value: unknown): OptionError {
    return new OptionError(path, expected, fmtValue(value));
  }

  /** The same error under the key path `parent` (`attnLayers` + `depth` -> `attnLayers.depth`). */
  in(parent: string): OptionError {
    return parent ? this.moved(`${parent}.${this.path}`) : this;
  }

  /** The same error under a camelCase prefix (`attn` + `dimHead` -> `attnDimHead`). */
  prefixed(prefix: string): OptionError {
    return this.moved(prefix + this.path[0]!.toUpperCase() + this.path.slice(1));
  }

  private moved(path: string): OptionError {
    const e = new OptionError(path, this.expected, this.got);
    e.cause = this;
    return e;
  }
}

/**
 * Runs `fn`; an OptionError it throws is re-thrown renamed by `rename` (e.g. `(e) => e.in('net')`).
 * Other errors pass unchanged.
 */
export function renamingOptions<T>(rename: (e: OptionError) => OptionError, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    if (e instanceof OptionError) throw rename(e);
    throw e;
  }
}
