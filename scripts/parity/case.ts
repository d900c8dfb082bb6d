import * as tf from '@tensorflow/tfjs-core';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { loadSafetensors } from '../../src/io/safetensors.js';
import type { Module } from '../../src/nn/module.js';

/** The reference constructor call recorded in a case (`__metadata__.case.spec`). */
export interface CaseSpec {
  wrapper: string;
  kwargs: Record<string, unknown>;
  attn_layers?: { type: string; kwargs: Record<string, unknown> };
  /** xtransformer cases: whether `input.src_prepend_embeds` is passed as `srcPrependEmbeds` */
  prepend?: boolean;
}

/** One parity case read from a `.safetensors` file. Tensors are owned by the case: call `dispose()`. */
export interface ParityCase {
  file: string;
  name: string;
  task: string;
  /** null or a number for model-free tasks (filters) */
  spec: CaseSpec | number | null;
  seed: number | null;
  reference: string;
  /** `param.*` entries under the reference's state_dict names (prefix removed) */
  params: Record<string, tf.Tensor>;
  /** `input.*` entries (prefix removed) */
  inputs: Record<string, tf.Tensor>;
  /** `output.*` entries (prefix removed) */
  outputs: Record<string, tf.Tensor>;
  dispose(): void;
}

/** Reads a case file. Throws an Error naming the file when its metadata is missing or malformed. */
export function readCase(file: string): ParityCase {
  const buf = readFileSync(file);
  const { metadata, tensors } = loadSafetensors(
    new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength),
    file,
  );
  const all = Object.values(tensors);
  const disposeAll = (): void => all.forEach((t) => t.dispose());
  try {
    const raw = metadata.case;
    if (raw === undefined) throw new Error(`${file}: no __metadata__.case`);
    let meta: Record<string, unknown>;
    try {
      meta = JSON.parse(raw) as Record<string, unknown>;
    } catch (e) {
      throw new Error(`${file}: __metadata__.case is not JSON (${(e as Error).message})`, { cause: e });
    }
    if (typeof meta !== 'object' || meta === null)
      throw new Error(`${file}: __metadata__.case must be an object`);
    if (typeof meta.task !== 'string') throw new Error(`${file}: case.task must be a string`);
    const spec = meta.spec ?? null;
    if (spec !== null && typeof spec !== 'number') {
      const s = spec as Partial<CaseSpec>;
      if (typeof s !== 'object' || typeof s.wrapper !== 'string' || typeof s.kwargs !== 'object') {
        throw new Error(
          `${file}: case.spec must be {wrapper, kwargs, attn_layers?}, got ${JSON.stringify(spec)}`,
        );
      }
    }
    const params: Record<string, tf.Tensor> = {};
    const inputs: Record<string, tf.Tensor> = {};
    const outputs: Record<string, tf.Tensor> = {};
    for (const [key, t] of Object.entries(tensors)) {
      const dot = key.indexOf('.');
      const kind = dot < 0 ? key : key.slice(0, dot);
      const rest = key.slice(dot + 1);
      if (kind === 'param') params[rest] = t;
      else if (kind === 'input') inputs[rest] = t;
      else if (kind === 'output') outputs[rest] = t;
      else throw new Error(`${file}: entry "${key}" is none of param.*, input.*, output.*`);
    }
    return {
      file,
      name: typeof meta.name === 'string' ? meta.name : path.basename(file, '.safetensors'),
      task: meta.task,
      spec: spec as CaseSpec | number | null,
      seed: typeof meta.seed === 'number' ? meta.seed : null,
      reference: typeof meta.reference === 'string' ? meta.reference : '',
      params,
      inputs,
      outputs,
      dispose: disposeAll,
    };
  } catch (e) {
    disposeAll();
    throw e;
  }
}

/**
 * Converts a case `spec` to the JSON `fromConfig` takes: `{wrapper, ...kwargs, attnLayers: {type, ...kwargs}}`.
 * Keys stay in the reference's snake_case, which `fromConfig` accepts as well as camelCase.
 */
export function specToConfig(spec: CaseSpec): Record<string, unknown> {
  const config: Record<string, unknown> = { wrapper: spec.wrapper, ...spec.kwargs };
  if (spec.attn_layers) config.attnLayers = { type: spec.attn_layers.type, ...spec.attn_layers.kwargs };
  return config;
}

/** The case's spec, or an Error when the case has none (model-free tasks). */
export function modelSpec(c: ParityCase): CaseSpec {
  if (c.spec === null || typeof c.spec === 'number') {
    throw new Error(`case ${c.name}: task ${c.task} needs a model spec, got ${JSON.stringify(c.spec)}`);
  }
  return c.spec;
}

/**
 * Builds the case's model with `fromConfig`, loads every `param.*` strictly (a missing, unexpected or
 * mis-shaped key throws) and puts it in eval mode, as the reference ran.
 */
export async function buildModel<M extends Module = Module>(c: ParityCase): Promise<M> {
  const { fromConfig } = await import('../../src/io/config.js');
  const model = fromConfig(specToConfig(modelSpec(c))) as unknown as M;
  try {
    model.loadStateDict(c.params, { strict: true });
  } catch (e) {
    model.dispose();
    throw e;
  }
  model.eval();
  return model;
}

/** An input of the case, or an Error naming it when absent. */
export function input(c: ParityCase, name: string): tf.Tensor {
  const t = c.inputs[name];
  if (!t) throw new Error(`case ${c.name}: missing input.${name}`);
  return t;
}

/** An expected output of the case, or an Error naming it when absent. */
export function expected(c: ParityCase, name: string): tf.Tensor {
  const t = c.outputs[name];
  if (!t) throw new Error(`case ${c.name}: missing output.${name}`);
  return t;
}
