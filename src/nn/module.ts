import * as tf from '@tensorflow/tfjs-core';
import { fmtShape } from '../utils/errors.js';

/** Options of `Module.loadStateDict`. */
export interface LoadStateDictOptions {
  /** Fail on any missing, unexpected or mis-shaped key (default true). */
  strict?: boolean;
}

/** What `loadStateDict` found when not strict. */
export interface LoadStateDictResult {
  missing: string[];
  unexpected: string[];
  mismatched: string[];
}

interface BufferEntry {
  tensor: tf.Tensor;
  persistent: boolean;
}

/**
 * The base of every layer: owns named parameters (tf.Variable), buffers and submodules, in
 * registration order, so that `namedParameters()` and `stateDict()` give the same dotted names as
 * the reference's PyTorch `state_dict()` (`attn_layers.layers.0.1.to_q.weight`).
 */
export class Module {
  training = true;
  private readonly _parameters = new Map<string, tf.Variable>();
  private readonly _buffers = new Map<string, BufferEntry>();
  private readonly _modules = new Map<string, Module>();

  /** Registers a trainable parameter, taking ownership of `init`. Returns the variable. */
  protected registerParameter(name: string, init: tf.Tensor, trainable = true): tf.Variable {
    this.checkFreeName(name);
    const v = init instanceof tf.Variable ? init : tf.variable(init, trainable);
    if (v !== init) init.dispose();
    this._parameters.set(name, v);
    return v;
  }

  /** Registers a buffer (saved in the state dict when persistent), taking ownership of `t`. */
  protected registerBuffer(name: string, t: tf.Tensor, persistent = true): tf.Tensor {
    this.checkFreeName(name);
    tf.keep(t);
    this._buffers.set(name, { tensor: t, persistent });
    return t;
  }

  /** Replaces a buffer's value (the old tensor is disposed). */
  protected setBuffer(name: string, t: tf.Tensor): void {
    const entry = this._buffers.get(name);
    if (!entry) throw new Error(`setBuffer: no buffer named "${name}"`);
    if (entry.tensor !== t) entry.tensor.dispose();
    tf.keep(t);
    entry.tensor = t;
  }

  protected getBuffer(name: string): tf.Tensor {
    const entry = this._buffers.get(name);
    if (!entry) throw new Error(`getBuffer: no buffer named "${name}"`);
    return entry.tensor;
  }

  /** Registers a submodule under `name`. Returns it, for `this.x = this.registerModule('x', ...)`. */
  protected registerModule<M extends Module>(name: string, module: M): M {
    this.checkFreeName(name);
    this._modules.set(name, module);
    return module;
  }

  private checkFreeName(name: string): void {
    if (!name || name.includes('.')) throw new Error(`Module: invalid name "${name}"`);
    if (this._parameters.has(name) || this._buffers.has(name) || this._modules.has(name)) {
      throw new Error(`Module: name "${name}" is already registered`);
    }
  }

  /** Direct submodules, in registration order. */
  children(): [string, Module][] {
    return [...this._modules.entries()];
  }

  /** Every submodule, depth first, including this one (name ''). Shared modules appear once. */
  namedModules(prefix = '', seen = new Set<Module>()): [string, Module][] {
    if (seen.has(this)) return [];
    seen.add(this);
    const out: [string, Module][] = [[prefix, this]];
    for (const [name, m] of this._modules) out.push(...m.namedModules(join(prefix, name), seen));
    return out;
  }

  /**
   * Every parameter with its dotted name. A parameter shared by several modules (weight tying)
   * is listed once, under the first name it was reached by, as in PyTorch.
   */
  namedParameters(): [string, tf.Variable][] {
    const out: [string, tf.Variable][] = [];
    const seen = new Set<tf.Variable>();
    this.walk('', (name, m) => {
      for (const [p, v] of m._parameters) {
        if (seen.has(v)) continue;
        seen.add(v);
        out.push([join(name, p), v]);
      }
    });
    return out;
  }

  parameters(): tf.Variable[] {
    return this.namedParameters().map(([, v]) => v);
  }

  /** Total number of scalars in the (distinct) parameters. */
  numParameters(): number {
    return this.parameters().reduce((n, v) => n + v.size, 0);
  }

  namedBuffers(onlyPersistent = false): [string, tf.Tensor][] {
    const out: [string, tf.Tensor][] = [];
    this.walk('', (name, m) => {
      for (const [b, e] of m._buffers)
        if (!onlyPersistent || e.persistent) out.push([join(name, b), e.tensor]);
    });
    return out;
  }

  /**
   * Parameters and persistent buffers by dotted name, as the reference's `state_dict()` lists them
   * (tied parameters appear under every name). The tensors are the module's own: do not dispose them.
   */
  stateDict(): Record<string, tf.Tensor> {
    const out: Record<string, tf.Tensor> = {};
    this.walk(
      '',
      (name, m) => {
        for (const [p, v] of m._parameters) out[join(name, p)] = v;
        for (const [b, e] of m._buffers) if (e.persistent) out[join(name, b)] = e.tensor;
      },
      false,
    );
    return out;
  }

  /**
   * Copies values from `dict` into the parameters and persistent buffers. Strict by default: every
   * missing, unexpected and mis-shaped key is listed in one Error and nothing is changed.
   * The caller keeps ownership of the tensors in `dict`.
   */
  loadStateDict(dict: Record<string, tf.Tensor>, options: LoadStateDictOptions = {}): LoadStateDictResult {
    const strict = options.strict ?? true;
    const targets = new Map<
      string,
      { owner: Module; key: string; kind: 'param' | 'buffer'; shape: number[] }
    >();
    this.walk(
      '',
      (name, m) => {
        for (const [p, v] of m._parameters)
          targets.set(join(name, p), { owner: m, key: p, kind: 'param', shape: v.shape });
        for (const [b, e] of m._buffers)
          if (e.persistent)
            targets.set(join(name, b), { owner: m, key: b, kind: 'buffer', shape: e.tensor.shape });
      },
      false,
    );
    const missing = [...targets.keys()].filter((k) => !(k in dict));
    const unexpected = Object.keys(dict).filter((k) => !targets.has(k));
    const mismatched: string[] = [];
    for (const [k, t] of targets) {
      const src = dict[k];
      if (src && !sameShape(src.shape, t.shape)) {
        mismatched.push(`${k} (expected ${fmtShape(t.shape)}, got ${fmtShape(src.shape)})`);
      }
    }
    if (strict && (missing.length || unexpected.length || mismatched.length)) {
      const parts: string[] = [];
      if (missing.length) parts.push(`missing keys: ${missing.join(', ')}`);
      if (unexpected.length) parts.push(`unexpected keys: ${unexpected.join(', ')}`);
      if (mismatched.length) parts.push(`mis-shaped keys: ${mismatched.join(', ')}`);
      throw new Error(`loadStateDict: ${parts.join('; ')}`);
    }
    const bad = new Set(mismatched.map((m) => m.split(' ')[0]));
    for (const [k, t] of targets) {
      const src = dict[k];
      if (!src || bad.has(k)) continue;
      if (t.kind === 'param') {
        const v = t.owner._parameters.get(t.key)!;
        if (src === v) continue; // loading a module's own state dict: nothing to copy
        if (src.dtype === v.dtype) v.assign(src);
        else {
          const cast = tf.cast(src, v.dtype);
          v.assign(cast);
          cast.dispose();
        }
      } else {
        const old = t.owner._buffers.get(t.key)!;
        if (src === old.tensor) continue;
        t.owner.setBuffer(
          t.key,
          tf.tidy(() => tf.cast(src, old.tensor.dtype).clone()),
        );
      }
    }
    return { missing, unexpected, mismatched };
  }

  /** Sets training mode on this module and every submodule. */
  train(mode = true): this {
    for (const [, m] of this.namedModules()) m.training = mode;
    return this;
  }

  /** Sets evaluation mode (no dropout) everywhere. */
  eval(): this {
    return this.train(false);
  }

  /** Frees every parameter and buffer of this module and its submodules. */
  dispose(): void {
    const seen = new Set<tf.Tensor>();
    this.walk('', (_n, m) => {
      const all = [...m._parameters.values(), ...[...m._buffers.values()].map((e) => e.tensor)];
      for (const t of all) {
        if (seen.has(t)) continue;
        seen.add(t);
        t.dispose();
      }
    });
  }

  private walk(
    prefix: string,
    fn: (name: string, m: Module) => void,
    dedupe = true,
    seen = new Set<Module>(),
  ): void {
    if (dedupe) {
      if (seen.has(this)) return;
      seen.add(this);
    }
    fn(prefix, this);
    for (const [name, m] of this._modules) m.walk(join(prefix, name), fn, dedupe, seen);
  }

  /** Shares another module's parameter under a local name (weight tying). */
  protected tieParameter(name: string, v: tf.Variable): void {
    this.checkFreeName(name);
    this._parameters.set(name, v);
  }

  protected hasParameter(name: string): boolean {
    return this._parameters.has(name);
  }
}

/** An indexed list of modules, named '0', '1', ... as PyTorch's nn.ModuleList. */
export class ModuleList<M extends Module = Module> extends Module {
  readonly items: M[] = [];

  constructor(items: M[] = []) {
    super();
    for (const m of items) this.push(m);
  }

  push(m: M): M {
    this.registerModule(String(this.items.length), m);
    this.items.push(m);
    return m;
  }

  get length(): number {
    return this.items.length;
  }

  at(i: number): M {
    const m = this.items[i];
    if (!m) throw new Error(`ModuleList: index ${i} out of range [0, ${this.items.length})`);
    return m;
  }

  [Symbol.iterator](): Iterator<M> {
    return this.items[Symbol.iterator]();
  }
}

function join(prefix: string, name: string): string {
  return prefix ? `${prefix}.${name}` : name;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** Modules by name, registered under their names as PyTorch's nn.ModuleDict (in insertion order). */
export class ModuleDict<M extends Module = Module> extends Module {
  readonly items = new Map<string, M>();

  constructor(items: Record<string, M> = {}) {
    super();
    for (const [name, m] of Object.entries(items)) this.set(name, m);
  }

  set(name: string, m: M): M {
    this.registerModule(name, m);
    this.items.set(name, m);
    return m;
  }

  get(name: string): M | undefined {
    return this.items.get(name);
  }
}
