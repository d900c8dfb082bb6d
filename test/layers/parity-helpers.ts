import * as tf from '@tensorflow/tfjs-core';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadSafetensors } from '../../src/io/safetensors.js';
import { AttentionLayers, CrossAttender, Decoder, Encoder } from '../../src/layers/attention-layers.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { PARITY_CASES } from '../../scripts/parity/paths.js';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The parity specification's reference cases (test/fixtures/parity), or XT_PARITY_DIR. */
export const VISIBLE = process.env.XT_PARITY_DIR ?? PARITY_CASES;

/** Extra reference cases for options the specification's cases do not cover (see fixtures/generate.py). */
export const FIXTURES = path.join(here, 'fixtures');

export interface Case {
  name: string;
  task: string;
  spec: {
    wrapper: string;
    kwargs: Record<string, unknown>;
    attn_layers?: { type: string; kwargs: Record<string, unknown> };
  };
  tensors: Record<string, tf.Tensor>;
}

export function camel(o: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o))
    out[k.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase())] = v;
  return out;
}

export function readCase(file: string): Case {
  const { metadata, tensors } = loadSafetensors(new Uint8Array(readFileSync(file)), file);
  const meta = JSON.parse(metadata.case!) as { name: string; task: string; spec: Case['spec'] };
  return { name: meta.name, task: meta.task, spec: meta.spec, tensors };
}

export function listCases(tasks: string[], dir = VISIBLE): string[] {
  if (!existsSync(dir)) throw new Error(`reference cases not found: ${dir} (set XT_PARITY_DIR)`);
  return readdirSync(dir)
    .filter((f) => f.endsWith('.safetensors'))
    .sort()
    .map((f) => path.join(dir, f))
    .filter((f) => {
      const buf = readFileSync(f);
      const len = Number(buf.readBigUInt64LE(0));
      const header = JSON.parse(buf.subarray(8, 8 + len).toString('utf8')) as {
        __metadata__: { case: string };
      };
      return tasks.includes((JSON.parse(header.__metadata__.case) as { task: string }).task);
    });
}

function makeLayers(type: string, kwargs: Record<string, unknown>): AttentionLayers {
  const o = camel(kwargs);
  if (type === 'Decoder') return new Decoder(o);
  if (type === 'Encoder') return new Encoder(o);
  if (type === 'CrossAttender') return new CrossAttender(o);
  throw new Error(`unsupported layers type ${type}`);
}

/** Builds the case's model and loads its `param.*` entries strictly. */
export function buildModel(c: Case): TransformerWrapper | AttentionLayers {
  let model: TransformerWrapper | AttentionLayers;
  if (c.spec.wrapper === 'TransformerWrapper') {
    const attnLayers = makeLayers(c.spec.attn_layers!.type, c.spec.attn_layers!.kwargs);
    model = new TransformerWrapper({
      ...(camel(c.spec.kwargs) as { numTokens: number; maxSeqLen: number }),
      attnLayers,
    });
  } else if (c.spec.wrapper === 'CrossAttender') {
    model = makeLayers('CrossAttender', c.spec.kwargs);
  } else throw new Error(`unsupported wrapper ${c.spec.wrapper}`);
  const params: Record<string, tf.Tensor> = {};
  for (const [k, v] of Object.entries(c.tensors)) if (k.startsWith('param.')) params[k.slice(6)] = v;
  model.loadStateDict(params);
  model.eval();
  return model;
}

/** max |a - b| and whether allclose(atol 1e-4, rtol 1e-3). */
export function compare(
  actual: tf.Tensor,
  expected: tf.Tensor,
): { ok: boolean; maxErr: number; shapeOk: boolean } {
  if (actual.shape.join() !== expected.shape.join()) return { ok: false, maxErr: Infinity, shapeOk: false };
  const a = actual.dataSync();
  const e = expected.dataSync();
  let maxErr = 0;
  let ok = true;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - e[i]!);
    if (!(d <= 1e-4 + 1e-3 * Math.abs(e[i]!))) ok = false;
    if (!(d <= maxErr)) maxErr = Number.isNaN(d) ? Infinity : Math.max(maxErr, d);
  }
  return { ok, maxErr, shapeOk: true };
}
