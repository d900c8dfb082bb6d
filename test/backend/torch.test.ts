import os from 'node:os';
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { registerTorchBackend } from '../../src/backend/torch/register.js';
import { loadAddon } from '../../src/backend/torch/native.js';
import { rowStableProducts, smallOps } from '../../src/backend/index.js';
import { LayerNorm } from '../../src/nn/norms.js';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

// The torch backend against the cpu backend on the same inputs, plus its memory behaviour.

let previous = '';

beforeAll(async () => {
  previous = tf.getBackend();
  const r = registerTorchBackend();
  if (!r.ok) throw new Error(r.reason);
});

afterAll(async () => {
  if (previous) await tf.setBackend(previous);
});

type Out = { shape: number[]; dtype: string; values: number[] };

async function on(backend: string, f: () => tf.Tensor | tf.Tensor[]): Promise<Out[]> {
  await tf.setBackend(backend);
  const outs = tf.tidy(f);
  const list = Array.isArray(outs) ? outs : [outs];
  const res = list.map((t) => ({ shape: t.shape, dtype: t.dtype, values: Array.from(t.dataSync()) }));
  tf.dispose(list);
  return res;
}

/** Runs `f` on cpu and on torch and checks that shapes, dtypes and values agree. */
async function same(f: () => tf.Tensor | tf.Tensor[], atol = 1e-5, rtol = 1e-4): Promise<void> {
  const cpu = await on('cpu', f);
  const torch = await on('torch', f);
  expect(torch.length).toBe(cpu.length);
  for (let k = 0; k < cpu.length; k++) {
    expect(torch[k].shape).toEqual(cpu[k].shape);
    expect(torch[k].dtype).toBe(cpu[k].dtype);
    cpu[k].values.forEach((v, i) => {
      const w = torch[k].values[i];
      if (Number.isNaN(v)) expect(Number.isNaN(w)).toBe(true);
      else expect(Math.abs(w - v)).toBeLessThanOrEqual(atol + rtol * Math.abs(v));
    });
  }
}

const rnd = (shape: number[], seed: number): tf.Tensor => tf.randomNormal(shape, 0, 1, 'float32', seed);

describe('torch backend matches cpu', () => {
  it('matmul with transposes and broadcast batch dims', async () => {
    await same(() => [
      tf.matMul(rnd([3, 4, 5], 1), rnd([3, 5, 2], 2)),
      tf.matMul(rnd([2, 5, 4], 3), rnd([2, 6, 5], 4), true, true),
      tf.matMul(rnd([2, 3, 4, 5], 5), rnd([1, 1, 5, 3], 6)),
    ]);
  });

  it('softmax, logSoftmax and elementwise math', async () => {
    await same(() => {
      const x = rnd([4, 7], 7);
      return [
        tf.softmax(x),
        tf.logSoftmax(x),
        tf.erf(x),
        tf.tanh(x),
        tf.sigmoid(x),
        tf.rsqrt(tf.abs(x)),
        tf.pow(tf.abs(x), tf.scalar(1.5)),
        tf.floorDiv(x, tf.scalar(0.3)),
        tf.mod(x, tf.scalar(0.7)),
        tf.squaredDifference(x, tf.reverse(x, 0)),
        tf.clipByValue(x, -0.5, 0.5),
      ];
    });
  });

  it('gather, gatherND, scatterND, oneHot, topk, cumsum', async () => {
    await same(() => {
      const x = rnd([5, 3, 4], 8);
      const idx = tf.tensor1d([4, 0, 2, 2], 'int32');
      return [
        tf.gather(x, idx),
        tf.gather(
          x,
          tf.tensor2d(
            [
              [1, 0],
              [3, 2],
            ],
            [2, 2],
            'int32',
          ),
          2,
        ),
        tf.gatherND(
          x,
          tf.tensor2d(
            [
              [0, 1],
              [4, 2],
            ],
            [2, 2],
            'int32',
          ),
        ),
        tf.scatterND(tf.tensor2d([[1], [3], [1]], [3, 1], 'int32'), tf.ones([3, 2]), [5, 2]),
        tf.oneHot(tf.tensor1d([0, 3, -1, 2], 'int32'), 4),
        ...Object.values(
          tf.topk(
            tf.tensor2d([
              [1, 9, 3, 7],
              [4, 2, 8, 6],
            ]),
            2,
          ),
        ),
        tf.cumsum(x, 1, true, true),
        tf.unsortedSegmentSum(x, tf.tensor1d([1, 0, 1, 2, 0], 'int32'), 3),
      ];
    });
  });

  it('topk: ties by lower index, int32, k of 0 and of the whole row, long rows', async () => {
    await same(
      () => {
        const ties = tf.tensor2d([
          [3, 1, 3, 2, 3, 1],
          [0, -0, 5, 5, -1, 5],
        ]);
        const ints = tf.tensor2d(
          [
            [4, 4, -2, 7, 7, 0],
            [1, 2, 3, 4, 5, 6],
          ],
          [2, 6],
          'int32',
        );
        // 3 rows of 1000 values with repeats (rounded), as a vocabulary's logits
        const long = tf.round(tf.mul(rnd([3, 1000], 4), 8));
        return [
          ...Object.values(tf.topk(ties, 4)),
          ...Object.values(tf.topk(ints, 3)),
          ...Object.values(tf.topk(ints, 6)),
          ...Object.values(tf.topk(ties, 0)),
          ...Object.values(tf.topk(long, 50)),
          ...Object.values(tf.topk(tf.reshape(long, [3, 10, 100]), 7)),
        ];
      },
      0,
      0,
    );
  });

  it('topk puts NaN first (lower index first among them)', async () => {
    await tf.setBackend('torch');
    const { values, indices } = tf.topk(tf.tensor1d([1, NaN, 3, NaN, 2]), 3);
    expect(Array.from(indices.dataSync())).toEqual([1, 3, 2]);
    const v = Array.from(values.dataSync());
    expect(Number.isNaN(v[0]) && Number.isNaN(v[1]) && v[2] === 3).toBe(true);
    tf.dispose([values, indices]);
  });

  it('reductions over axes, with and without keepDims', async () => {
    await same(() => {
      const x = rnd([3, 4, 5], 9);
      const b = tf.greater(x, 0);
      return [
        tf.sum(x),
        tf.sum(x, [0, 2], true),
        tf.mean(x, -1),
        tf.max(x, 1),
        tf.min(x, [0, 1]),
        tf.prod(x, 2),
        tf.argMax(x, 1),
        tf.argMin(x, -1),
        tf.all(b, 1),
        tf.any(b, [0, 2]),
        tf.sum(tf.cast(b, 'int32'), 0),
        tf.logSumExp(x, 1),
      ];
    });
  });

  it('slicing, padding, concat, stack, tile, broadcast', async () => {
    await same(() => {
      const x = rnd([4, 6], 10);
      return [
        tf.slice(x, [1, 2], [2, -1]),
        tf.stridedSlice(tf.range(0, 10), [8], [2], [-2]),
        tf.stridedSlice(x, [0, 1], [4, 6], [2, 2]),
        tf.stridedSlice(x, [1, 0], [3, 6], [1, 2]),
        tf.pad(x, [
          [1, 0],
          [2, 3],
        ]),
        tf.mirrorPad(
          x,
          [
            [1, 2],
            [2, 1],
          ],
          'reflect',
        ),
        tf.mirrorPad(
          x,
          [
            [1, 2],
            [2, 1],
          ],
          'symmetric',
        ),
        tf.concat([x, x, tf.zeros([4, 1])], 1),
        tf.stack([x, x], 1),
        ...tf.unstack(x, 1),
        ...tf.split(x, [1, 2, 3], 1),
        tf.tile(x, [2, 1]),
        tf.broadcastTo(tf.tensor1d([1, 2, 3]), [2, 3]),
        tf.where(tf.greater(x, 0), x, tf.neg(x)),
        tf.linspace(0, 1, 7),
        tf.range(3, 20, 4, 'int32'),
        tf.transpose(rnd([2, 3, 4], 11), [2, 0, 1]),
      ];
    });
  });

  it('gradients of a small network', async () => {
    await same(() => {
      const w = rnd([6, 5], 12);
      const emb = rnd([10, 6], 13);
      const ids = tf.tensor2d(
        [
          [1, 4, 9],
          [0, 0, 3],
        ],
        [2, 3],
        'int32',
      );
      const labels = tf.tensor2d(
        [
          [1, 2, 3],
          [4, 0, 1],
        ],
        [2, 3],
        'int32',
      );
      const loss = (e: tf.Tensor, ww: tf.Tensor): tf.Scalar => {
        const h = tf.gather(e, ids);
        const logits = tf.matMul(tf.reshape(h, [6, 6]), ww);
        const z = tf.mul(logits, tf.sigmoid(tf.mul(logits, 1.702)));
        const lp = tf.logSoftmax(z);
        const pick = tf.oneHot(tf.reshape(labels, [6]), 5);
        return tf.neg(tf.mean(tf.sum(tf.mul(lp, pick), -1)));
      };
      const g = tf.grads(loss)([emb, w]);
      return [loss(emb, w), ...g];
    });
  });
});

/**
 * A script for bitsOnBothWidths: for a decoder of each [dim, heads, head width], three rows' prompts
 * prefilled, then `steps` steps of the three rows together (the rows kernel), printing every step's
 * logits as bits. With `slide`, a row past maxSeqLen - 1 positions keeps its last maxSeqLen - 1 before
 * each step (a window of its buffer, as BatchDecoder keeps past maxSeqLen).
 */
function rowStepsScript(o: {
  shapes: [number, number, number][];
  depth: number;
  maxSeqLen: number;
  prompts: number[][];
  steps: number;
  slide: boolean;
}): string {
  return [
    "const tf = await import('@tensorflow/tfjs-core');",
    "const { registerTorchBackend } = await import('./src/backend/torch/register.ts');",
    "const { Decoder } = await import('./src/layers/attention-layers.ts');",
    "const { manualSeed } = await import('./src/utils/random.ts');",
    "const { TransformerWrapper } = await import('./src/wrappers/transformer-wrapper.ts');",
    'const r = registerTorchBackend();',
    'if (!r.ok) { console.log(JSON.stringify({ reason: r.reason })); process.exit(0); }',
    "await tf.setBackend('torch');",
    `const o = ${JSON.stringify(o)};`,
    'const out = [];',
    'for (const [dim, heads, dh] of o.shapes) {',
    '  manualSeed(dh);',
    '  const net = new TransformerWrapper({ numTokens: 32, maxSeqLen: o.maxSeqLen,',
    '    attnLayers: new Decoder({ dim, depth: o.depth, heads, attnDimHead: dh, rotaryPosEmb: true }) });',
    '  net.eval();',
    '  const kinds = net.attnLayers.cachedLayerKinds();',
    '  let caches = o.prompts.map((p) => {',
    '    const w = p.slice(-o.maxSeqLen);',
    "    return net.forwardWithState(tf.tensor2d([w], [1, w.length], 'int32'), { returnCache: true }).cache;",
    '  });',
    '  for (let step = 0; step < o.steps; step++) {',
    '    const keep = o.maxSeqLen - 1;',
    '    if (o.slide) caches = caches.map((c) => (c.seqLen > keep ? c.trimmed(keep, kinds) : c));',
    "    const x = tf.tensor2d([step % 32, (step * 5 + 1) % 32, (step * 7 + 2) % 32], [3, 1], 'int32');",
    '    const s = net.forwardWithState(x, { rowCaches: caches });',
    '    out.push(...Array.from(new Uint32Array(s.logits.dataSync().slice().buffer)));',
    '    caches = s.rowCaches;',
    '  }',
    '}',
    'console.log(JSON.stringify({ bits: out }));',
  ].join('\n');
}

/**
 * Runs `script` (an ES module printing {bits} or, without the torch backend, {reason}) in a fresh
 * process with 512-bit vectors and again with XT_NO_AVX512; returns both results.
 */
function bitsOnBothWidths(script: string): [{ bits?: number[] }, { bits?: number[] }] {
  const run = (env: Record<string, string>): { bits?: number[]; reason?: string } => {
    const p = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
      env: { ...process.env, ...env },
      encoding: 'utf8',
    });
    expect(p.status, p.stderr).toBe(0);
    return JSON.parse(p.stdout.trim().split('\n').pop()!);
  };
  const wide = run({});
  if (wide.reason) throw new Error(`torch backend unavailable: ${wide.reason}`);
  return [wide, run({ XT_NO_AVX512: '1' })];
}

describe('torch matrix products', () => {
  it('run on oneDNN sgemm exactly when the process has libdnnl', () => {
    const r = registerTorchBackend();
    if (!r.ok) throw new Error(r.reason);
    const maps = readFileSync('/proc/self/maps', 'utf8');
    expect(r.gemm).toBe(/libdnnl\.so/.test(maps) && r.device === 'cpu' ? 'dnnl' : 'aten');
  });

  it('with rowStableProducts, each row of a product equals that row alone, bit for bit', async () => {
    await tf.setBackend('torch');
    // odd inner sizes (a tail after the multiples of 8), column counts that are not multiples of 4
    // or 8, weights of a linear layer ([out, in], transposed) and row-major, 2 to 11 rows
    const shapes: [number, number, number][] = [
      [2, 13, 7],
      [3, 64, 256],
      [5, 257, 61],
      [8, 100, 1030],
      [11, 33, 9],
      [9, 300, 50],
    ];
    for (const [m, k, n] of shapes) {
      const x = rnd([m, k], m + k);
      const wT = rnd([n, k], n);
      const w = rnd([k, n], n + 1);
      for (const [b, transposeB] of [
        [wT, true],
        [w, false],
      ] as const) {
        const together = rowStableProducts(m, () => tf.matMul(x, b, false, transposeB));
        const got = together.arraySync() as number[][];
        for (let r = 0; r < m; r++) {
          const row = tf.slice(x, [r, 0], [1, k]);
          const alone = tf.matMul(row, b, false, transposeB);
          expect(got[r]).toEqual((alone.arraySync() as number[][])[0]);
          tf.dispose([row, alone]);
        }
        together.dispose();
      }
      tf.dispose([x, wT, w]);
    }
  });

  it('products of a few rows give the same numbers on 256-bit vectors as on 512-bit ones', () => {
    // a weight of a linear layer times 1 to 11 rows in small-op mode (the packed panels); inner
    // sizes around the 64-long chunks, column counts off the 16-wide panels
    const script = [
      "const tf = await import('@tensorflow/tfjs-core');",
      "const { registerTorchBackend } = await import('./src/backend/torch/register.ts');",
      "const { smallOps } = await import('./src/backend/index.ts');",
      'const r = registerTorchBackend();',
      'if (!r.ok) { console.log(JSON.stringify({ reason: r.reason })); process.exit(0); }',
      "await tf.setBackend('torch');",
      'const out = [];',
      'for (const [m, k, n] of [[1, 64, 16], [3, 65, 33], [8, 130, 40], [11, 257, 70]]) {',
      '  const x = tf.randomNormal([m, k], 0, 1, "float32", m);',
      '  const w = tf.randomNormal([n, k], 0, 1, "float32", k);',
      '  const y = smallOps(() => tf.matMul(x, w, false, true));',
      '  out.push(...Array.from(new Uint32Array(y.dataSync().slice().buffer)));',
      '}',
      'console.log(JSON.stringify({ bits: out }));',
    ].join('\n');
    const [wide, narrow] = bitsOnBothWidths(script);
    expect(wide.bits!.length).toBe(1 * 16 + 3 * 33 + 8 * 40 + 11 * 70);
    expect(narrow.bits).toEqual(wide.bits);
  });

  it("decoding steps' attention gives the same numbers on 256-bit vectors as on 512-bit ones", () => {
    // cached steps of three rows of different lengths (the rows kernel), with head widths that take
    // the paired-heads weighted sum (multiples of 32, odd head counts) and ones that do not, and
    // that take the sixteen-lane scores (multiples of 16: one, two, three, four and six chunks) and
    // one that does not (40); rows of 2 to 31 keys (blocks of sixteen and of four, and their rests)
    const script = rowStepsScript({
      shapes: [
        [64, 3, 32],
        [96, 2, 64],
        [64, 3, 96],
        [64, 2, 40],
        [32, 2, 16],
        [48, 1, 48],
      ],
      depth: 1,
      maxSeqLen: 64,
      prompts: [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]],
      steps: 20,
      slide: false,
    });
    const [wide, narrow] = bitsOnBothWidths(script);
    expect(wide.bits!.length).toBe(6 * 20 * 3 * 32);
    expect(narrow.bits).toEqual(wide.bits);
  });

  it('decoding past maxSeqLen turns the kept keys to the same numbers on 256-bit vectors as on 512-bit ones', () => {
    // rows whose caches are windows of their last positions (each step keeps maxSeqLen - 1, as
    // BatchDecoder does), so every step turns the window's keys by their new positions; head widths
    // that take 16 features at a time (32, 64, 96, 48) and one that does not (40)
    const script = rowStepsScript({
      shapes: [
        [64, 3, 32],
        [96, 2, 64],
        [64, 1, 96],
        [64, 2, 40],
        [48, 1, 48],
      ],
      depth: 2,
      maxSeqLen: 12,
      prompts: [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [15]],
      steps: 24,
      slide: true,
    });
    const [wide, narrow] = bitsOnBothWidths(script);
    expect(wide.bits!.length).toBe(5 * 24 * 3 * 32);
    expect(narrow.bits).toEqual(wide.bits);
  });

  it('strided, broadcast, one-row, empty and large products match cpu', async () => {
    await same(
      () => {
        const a = rnd([2, 3, 4, 5], 11);
        return [
          // transposed views as operands
          tf.matMul(tf.transpose(a, [0, 1, 3, 2]), rnd([2, 3, 4, 6], 12)),
          tf.matMul(tf.transpose(rnd([4, 2, 5], 13), [1, 0, 2]), rnd([2, 5, 3], 14)),
          // broadcasting on both sides (the cpu kernel folds batch dims by modulo, so it gets the
          // operands tiled out)
          tf.getBackend() === 'cpu'
            ? tf.matMul(
                tf.tile(rnd([2, 1, 3, 4], 15), [1, 5, 1, 1]),
                tf.tile(rnd([1, 5, 4, 2], 16), [2, 1, 1, 1]),
              )
            : tf.matMul(rnd([2, 1, 3, 4], 15), rnd([1, 5, 4, 2], 16)),
          // decoding shapes: one row against a transposed weight
          tf.matMul(rnd([1, 1, 64], 17), rnd([96, 64], 18), false, true),
          tf.matMul(rnd([1, 64], 17), rnd([64, 96], 19)),
          // a few rows (read in place up to 4), with lengths that are not multiples of the vector
          // width, both layouts, batched heads as in cached attention
          tf.matMul(rnd([3, 1, 37], 26), rnd([45, 37], 27), false, true),
          tf.matMul(rnd([4, 70], 28), rnd([70, 67], 29)),
          tf.matMul(rnd([2, 4, 1, 16], 30), rnd([2, 4, 9, 16], 31), false, true),
          tf.matMul(rnd([2, 4, 1, 9], 32), rnd([2, 4, 9, 16], 33)),
          // many rows against a transposed weight (copied to row-major first)
          tf.matMul(rnd([130, 40], 34), rnd([50, 40], 35), false, true),
          // empty dims
          tf.matMul(rnd([2, 0, 4], 20), rnd([2, 4, 3], 21)),
          tf.matMul(tf.zeros([2, 3, 0]), tf.zeros([2, 0, 4])),
          // large enough for the blocked kernels
          tf.matMul(rnd([130, 257], 22), rnd([257, 190], 23)),
          tf.matMul(rnd([3, 70, 33], 24), rnd([3, 90, 33], 25), false, true),
        ];
      },
      1e-4,
      1e-4,
    );
  });

  it('XT_GEMM=aten gives the same products; bad XT_GEMM and XT_CPU_CACHE_MB are named', () => {
    const script = [
      "const tf = await import('@tensorflow/tfjs-core');",
      "const { registerTorchBackend } = await import('./src/backend/torch/register.ts');",
      'const r = registerTorchBackend();',
      'if (!r.ok) { console.log(JSON.stringify({ reason: r.reason })); process.exit(0); }',
      "await tf.setBackend('torch');",
      'const a = tf.randomNormal([3, 40, 50], 0, 1, "float32", 1);',
      'const b = tf.randomNormal([50, 30], 0, 1, "float32", 2);',
      'console.log(JSON.stringify({ gemm: r.gemm, y: Array.from(tf.matMul(a, b).dataSync()) }));',
    ].join('\n');
    const run = (gemm: string, cacheMb = '64'): { gemm?: string; y?: number[]; reason?: string } => {
      const p = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        env: { ...process.env, XT_GEMM: gemm, XT_CPU_CACHE_MB: cacheMb },
        encoding: 'utf8',
      });
      expect(p.status, p.stderr).toBe(0);
      return JSON.parse(p.stdout.trim().split('\n').pop()!);
    };
    const aten = run('aten');
    const auto = run('auto');
    expect(aten.gemm).toBe('aten');
    expect(auto.y!.length).toBe(3 * 40 * 30);
    auto.y!.forEach((v, i) => expect(Math.abs(v - aten.y![i]!)).toBeLessThan(1e-4 * (1 + Math.abs(v))));
    expect(run('blas').reason).toMatch(/XT_GEMM: expected auto, dnnl or aten, got "blas"/);
    expect(run('auto', '-3').reason).toMatch(/XT_CPU_CACHE_MB: expected a non-negative integer, got "-3"/);
    const noCache = run('auto', '0');
    noCache.y!.forEach((v, i) => expect(v).toBe(auto.y![i]));
  });
});

describe('torch matmul weight layout cache', () => {
  it('decoding-shaped products see updated and reallocated weights', async () => {
    await tf.setBackend('torch');
    const x = tf.ones([1, 64]);
    const first = (w: tf.Tensor): number => tf.tidy(() => tf.matMul(x, w, false, true).dataSync()[0]);
    const w = tf.variable(tf.fill([128, 64], 1));
    expect(first(w)).toBe(64);
    w.assign(tf.fill([128, 64], 2));
    expect(first(w)).toBe(128);
    for (let k = 0; k < 50; k++) {
      const w2 = tf.fill([128, 64], k); // freed each turn: the same address may come back
      expect(first(w2)).toBe(64 * k);
      w2.dispose();
    }
    tf.dispose([x, w]);
  });
});

describe('fused XtAttention kernel', () => {
  // reference: softmax(q k^T * scale, masked to -FLT_MAX) v, rows with an empty mask give 0
  const composite = (q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, mask: tf.Tensor, scale: number): tf.Tensor => {
    const [i, j] = [q.shape[2]!, k.shape[2]!];
    let s = tf.mul(tf.matMul(q, k, false, true), scale);
    const neg = tf.scalar(-3.4028234663852886e38);
    s = tf.where(mask, s, neg);
    const causal = tf.lessEqual(tf.reshape(tf.range(0, j), [1, j]), tf.reshape(tf.range(j - i, j), [i, 1]));
    s = tf.where(causal, s, neg);
    const out = tf.matMul(tf.softmax(s), v);
    return tf.where(tf.any(mask, -1, true), out, tf.zerosLike(out));
  };
  const fused = (q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, mask: tf.Tensor, scale: number): tf.Tensor =>
    tf.engine().runKernel('XtAttention', { q, k, v, mask }, {
      scale,
      causal: true,
    } as unknown as tf.NamedAttrMap) as tf.Tensor;

  it('matches the composite forward and gradients, with causal and an empty mask row', async () => {
    const inputs = (): tf.Tensor[] => {
      const q = rnd([2, 2, 3, 4], 21);
      const k = rnd([2, 2, 5, 4], 22);
      const v = rnd([2, 2, 5, 3], 23);
      const m = tf.tensor4d(
        [1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0],
        [2, 1, 3, 5],
        'bool',
      );
      return [q, k, v, m];
    };
    const dy = (): tf.Tensor => rnd([2, 2, 3, 3], 24);
    const run = (f: typeof composite) => (): tf.Tensor[] => {
      const [q, k, v, m] = inputs();
      const g = tf.grads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => f(a, b, c, m, 0.5))([q, k, v], dy());
      return [f(q, k, v, m, 0.5), ...g];
    };
    const cpu = await on('cpu', run(composite));
    const torch = await on('torch', run(fused));
    for (let n = 0; n < cpu.length; n++) {
      expect(torch[n].shape).toEqual(cpu[n].shape);
      cpu[n].values.forEach((x, idx) => expect(Math.abs(torch[n].values[idx] - x)).toBeLessThan(1e-5));
    }
  });

  it("the library's mask-less causal attend trains through the native backward kernel", async () => {
    const { attend } = await import('../../src/attention/attend.js');
    const run = (): tf.Tensor[] => {
      const [q, k, v] = [rnd([1, 2, 4, 8], 31), rnd([1, 2, 4, 8], 32), rnd([1, 2, 4, 8], 33)];
      const g = tf.grads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => attend(a, b, c, { causal: true }))(
        [q, k, v],
        rnd([1, 2, 4, 8], 34),
      );
      return [attend(q, k, v, { causal: true }), ...g];
    };
    const cpu = await on('cpu', run);
    await tf.setBackend('torch');
    const info = await tf.profile(() => tf.dispose(run()));
    expect(info.kernelNames).toContain('XtAttention');
    expect(info.kernelNames).toContain('XtAttentionGrad');
    const torch = await on('torch', run);
    for (let n = 0; n < cpu.length; n++) {
      cpu[n].values.forEach((x, idx) => expect(Math.abs(torch[n].values[idx] - x)).toBeLessThan(1e-5));
    }
  });

  it('long causal attention (computed by blocks of 64 query rows) matches the composite on cpu', async () => {
    const { attend } = await import('../../src/attention/attend.js');
    for (const n of [128, 200]) {
      // 200 rows: three whole blocks and a partial one
      const run = (): tf.Tensor[] => {
        const [q, k, v] = [rnd([2, 3, n, 16], 41), rnd([2, 3, n, 16], 42), rnd([2, 3, n, 16], 43)];
        const g = tf.grads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) => attend(a, b, c, { causal: true }))(
          [q, k, v],
          rnd([2, 3, n, 16], 44),
        );
        return [attend(q, k, v, { causal: true }), ...g];
      };
      await same(run, 2e-5, 1e-4);
    }
  });
});

describe('torch small-op mode (decoding steps)', () => {
  it('smallOps turns the mode on for its call only, also when the call throws', async () => {
    await tf.setBackend('torch');
    const be = tf.backend() as unknown as { setSmallOps(on: boolean): boolean };
    expect(smallOps(() => be.setSmallOps(true))).toBe(true);
    expect(be.setSmallOps(false)).toBe(false);
    expect(() =>
      smallOps(() => {
        throw new Error('inside');
      }),
    ).toThrow('inside');
    expect(be.setSmallOps(false)).toBe(false);
  });

  it('gives the same numbers as the ops on every thread', async () => {
    await tf.setBackend('torch');
    // rows through layer norm, GELU, softmax and products with weights large enough for threads
    const norm = new LayerNorm(512);
    const f = () =>
      tf.tidy(() => {
        const x = rnd([8, 1, 512], 21);
        const w = rnd([4608, 512], 22);
        const h = tf.reshape(norm.forward(x), [8, 512]);
        const y = tf.matMul(h, w, false, true);
        return tf.softmax(tf.mul(y, tf.sigmoid(y)), -1);
      });
    const one = rowStableProducts(8, () => smallOps(f));
    const all = rowStableProducts(8, f);
    expect(Array.from(one.dataSync())).toEqual(Array.from(all.dataSync()));
    tf.dispose([one, all]);
    norm.dispose();
  });
});

describe('torch backend threads', () => {
  it('refuses a second JavaScript thread (the registry is per process) and keeps serving the first', async () => {
    const { Worker } = await import('node:worker_threads');
    const { addonPath } = await import('../../src/backend/torch/native.js');
    const message = await new Promise<string>((resolve, reject) => {
      const w = new Worker(
        `const { parentPort, workerData } = require('node:worker_threads');
         try { require(workerData); parentPort.postMessage('loaded'); }
         catch (e) { parentPort.postMessage(String(e.message)); }`,
        { eval: true, workerData: addonPath() },
      );
      w.once('message', (m: string) => resolve(m));
      w.once('error', reject);
    });
    expect(message).toMatch(/in use by another JavaScript thread/);
    await tf.setBackend('torch');
    const t = tf.tensor1d([1, 2, 3]);
    expect(Array.from(tf.mul(t, 2).dataSync())).toEqual([2, 4, 6]);
    t.dispose();
  });
});

describe('torch backend memory', () => {
  it('frees native storage when tensors are disposed', async () => {
    await tf.setBackend('torch');
    const N = loadAddon();
    const before = N.count();
    const bytes = N.bytes();
    // blocks this large bypass the reuse cache; 256 MiB each dwarfs what the JS heap moves meanwhile
    const size = 256 * 2 ** 20;
    const x = tf.fill([1024, 1024, 64], 1.5);
    const rss1 = process.memoryUsage().rss;
    const y = tf.add(x, 1);
    const rss2 = process.memoryUsage().rss;
    expect(N.bytes() - bytes).toBe(2 * size);
    expect(rss2 - rss1).toBeGreaterThan(0.75 * size);
    expect(N.count()).toBe(before + 2);
    tf.dispose([x, y]);
    expect(N.count()).toBe(before);
    expect(N.bytes()).toBe(bytes);
    // and the pages went back to the system
    const rss3 = process.memoryUsage().rss;
    expect(rss2 - rss3).toBeGreaterThan(1.5 * size);
  });

  it('keeps freed CPU blocks for reuse, within XT_CPU_CACHE_MB', async () => {
    await tf.setBackend('torch');
    const N = loadAddon();
    const { limitBytes } = N.cpuCache();
    // by default a 32nd of the machine's memory, from 64 MiB to 1 GiB
    const defaultMb = Math.min(1024, Math.max(64, Math.floor(os.totalmem() / 2 ** 20 / 32)));
    expect(limitBytes).toBe(Number(process.env.XT_CPU_CACHE_MB ?? defaultMb) * 2 ** 20);
    // a freed 1 MiB block is kept, and the next tensor of that size takes it back
    const a = tf.fill([256, 1024], 2);
    const before = N.cpuCache().cachedBytes;
    a.dispose();
    const kept = N.cpuCache().cachedBytes - before;
    expect(kept).toBeGreaterThanOrEqual(2 ** 20);
    expect(kept).toBeLessThanOrEqual(2 ** 20 * 1.125 + 4096);
    const b = tf.fill([256, 1024], 3); // the reused block holds the new values
    expect(N.cpuCache().cachedBytes).toBe(before);
    expect(Array.from(b.dataSync().subarray(0, 3))).toEqual([3, 3, 3]);
    b.dispose();
    // many distinct sizes freed at once: the cache stays within its bound
    const many = Array.from({ length: 120 }, (_, k) => tf.fill([256 + 8 * k, 1024], k));
    tf.dispose(many);
    expect(N.cpuCache().cachedBytes).toBeLessThanOrEqual(limitBytes);
    expect(N.cpuCache().cachedBytes).toBeGreaterThan(limitBytes / 2);
  });

  it('keeps RSS and tensor counts flat over 10,000 small ops', async () => {
    await tf.setBackend('torch');
    const N = loadAddon();
    const a = tf.randomNormal([16, 16]);
    const b = tf.randomNormal([16, 16]);
    const step = (): void => {
      const c = tf.tidy(() => tf.sum(tf.softmax(tf.add(tf.matMul(a, b), 1))));
      c.dataSync();
      c.dispose();
    };
    for (let k = 0; k < 500; k++) step();
    const tensors = tf.memory().numTensors;
    const native = [N.count(), N.bytes()];
    // two windows of 2,500 steps (4 ops each): a leak grows RSS in both; a one-off rise of the JS heap
    // or of the allocator's pools shows in one at most
    const rss = [process.memoryUsage().rss];
    for (let w = 0; w < 2; w++) {
      for (let k = 0; k < 2500; k++) step();
      rss.push(process.memoryUsage().rss);
    }
    expect(tf.memory().numTensors).toBe(tensors);
    expect([N.count(), N.bytes()]).toEqual(native);
    expect(Math.min(rss[1]! - rss[0]!, rss[2]! - rss[1]!)).toBeLessThan(4 * 2 ** 20);
    tf.dispose([a, b]);
  });
});
