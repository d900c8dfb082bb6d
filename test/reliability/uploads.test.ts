import * as tf from '@tensorflow/tfjs-core';
import fc from 'fast-check';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeEnv, tinyDecoder, type TestEnv } from '../service/helpers.js';

// Uploads, generated: weights files with random and mutated headers (lying offsets, huge declared
// sizes, wrong dtypes and shapes, truncations) and dataset bodies (invalid UTF-8, huge lines, empty
// bodies). Every answer is a success for a valid upload or a 4xx whose message names the field; the
// process keeps answering; a batch leaves no tensor behind and no lasting growth of the heap.

const RUNS = Number(process.env.XT_FUZZ_RUNS ?? 150);
const UPLOAD_LIMIT = 1024 * 1024;

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/** Heap in use and resident size after a full collection. */
function settledMemory(): { heap: number; rss: number } {
  gc();
  gc();
  const m = process.memoryUsage();
  return { heap: m.heapUsed, rss: m.rss };
}

const MiB = 1024 * 1024;

function report(what: string, before: { heap: number; rss: number }, after: { heap: number; rss: number }) {
  const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;
  console.log(
    `${what}: ${RUNS} after ${Math.ceil(RUNS / 3)} of warm-up; heap ${mib(before.heap)} -> ${mib(after.heap)}, ` +
      `RSS ${mib(before.rss)} -> ${mib(after.rss)}`,
  );
}

/** A safetensors file from a header object (written as given: lies included) and data bytes. */
function safetensors(header: unknown, data: Uint8Array, declaredLength?: bigint): Uint8Array {
  const h = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + h.length + data.length);
  new DataView(out.buffer).setBigUint64(0, declaredLength ?? BigInt(h.length), true);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  return out;
}

function readHeader(file: Uint8Array): { header: Record<string, Record<string, unknown>>; data: Uint8Array } {
  const len = Number(new DataView(file.buffer, file.byteOffset).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(file.subarray(8, 8 + len))) as Record<
    string,
    Record<string, unknown>
  >;
  return { header, data: file.subarray(8 + len) };
}

const hugeInt = fc.constantFrom(2 ** 31, 2 ** 32 + 1, 2 ** 53 - 1, 2 ** 53, 1e300, -1, 0.5, 3);
const dtype = fc.constantFrom(
  'F32',
  'F16',
  'BF16',
  'F64',
  'I64',
  'I32',
  'I8',
  'U8',
  'BOOL',
  'F8',
  'x',
  7,
  null,
);

describe('uploads, fuzzed (real Redis, no worker)', () => {
  let env: TestEnv;
  let modelId = '';
  let valid: Uint8Array;
  beforeAll(async () => {
    env = await makeEnv({ app: { limits: { maxUploadBytes: UPLOAD_LIMIT } } });
    modelId = (
      await env.app.inject({
        method: 'POST',
        url: '/v1/models',
        payload: { name: 'u', config: tinyDecoder() },
      })
    ).json().id;
    valid = new Uint8Array(
      (await env.app.inject({ method: 'GET', url: `/v1/models/${modelId}/weights` })).rawPayload,
    );
  });
  afterAll(async () => env?.close());

  /** A weights file: valid, or mutated in one of the ways a broken or hostile client might. */
  const weightsFile = () => {
    const { header, data } = readHeader(valid);
    const names = Object.keys(header).filter((k) => k !== '__metadata__');
    const entry = fc.constantFrom(...names);
    return fc.oneof(
      fc.constant({ kind: 'valid', bytes: valid }),
      fc.uint8Array({ maxLength: 300 }).map((bytes) => ({ kind: 'random bytes', bytes })),
      fc
        .bigInt({ min: 0n, max: 2n ** 64n - 1n })
        .map((n) => ({ kind: 'header length', bytes: safetensors(header, data, n) })),
      fc
        .integer({ min: 0, max: valid.length - 1 })
        .map((n) => ({ kind: 'truncated', bytes: valid.subarray(0, n) })),
      fc.tuple(fc.integer({ min: 8, max: 8 + 200 }), fc.integer({ min: 0, max: 255 })).map(([at, b]) => {
        const bytes = valid.slice();
        bytes[at] = b;
        return { kind: 'header byte', bytes };
      }),
      fc.jsonValue({ maxDepth: 2 }).map((h) => ({ kind: 'json header', bytes: safetensors(h, data) })),
      fc
        .tuple(
          entry,
          fc.constantFrom('dtype', 'shape', 'data_offsets'),
          dtype,
          fc.array(hugeInt, { maxLength: 3 }),
        )
        .map(([name, field, dt, nums]) => {
          const h = structuredClone(header);
          const e = h[name]!;
          if (field === 'dtype') e.dtype = dt;
          else if (field === 'shape') e.shape = nums;
          else {
            // lying offsets: past the data, reversed, overlapping another entry, or huge
            const [b, en] = e.data_offsets as [number, number];
            e.data_offsets = nums.length >= 2 ? nums.slice(0, 2) : [en, b + (nums[0] ?? 0)];
          }
          return { kind: `entry ${field}`, bytes: safetensors(h, data) };
        }),
      fc
        .tuple(entry, fc.constantFrom('__proto__', 'constructor', 'toString', 'net.extra', ''))
        .map(([name, extra]) => {
          // a well-formed entry with data of its own, under a name the model does not have
          const h = structuredClone(header);
          const e = h[name]!;
          const [b, en] = e.data_offsets as [number, number];
          const more = new Uint8Array(data.length + en - b);
          more.set(data);
          more.set(data.subarray(b, en), data.length);
          const copy = { ...e, data_offsets: [data.length, data.length + en - b] };
          Object.defineProperty(h, extra, { value: copy, enumerable: true });
          return { kind: 'extra entry', bytes: safetensors(h, more) };
        }),
      entry.map((name) => {
        const h = structuredClone(header);
        delete h[name];
        return { kind: 'missing entry', bytes: safetensors(h, data) };
      }),
    );
  };

  const put = (bytes: Uint8Array) =>
    env.app.inject({
      method: 'PUT',
      url: `/v1/models/${modelId}/weights`,
      headers: { 'content-type': 'application/octet-stream' },
      payload: Buffer.from(bytes),
    });

  it('weights: valid files load, every other one is a 4xx naming the field; nothing is kept', async () => {
    const seen = new Map<string, number>();
    const property = fc.asyncProperty(weightsFile(), async ({ kind, bytes }) => {
      const r = await put(bytes);
      const body = r.json();
      if (kind === 'valid') expect([kind, r.statusCode]).toEqual([kind, 200]);
      // these never make a file that matches the model
      if (['random bytes', 'json header', 'extra entry', 'missing entry'].includes(kind))
        expect([kind, r.statusCode]).toEqual([kind, 400]);
      if (kind === 'truncated' || (kind === 'header length' && bytes.length !== valid.length))
        expect([kind, r.statusCode]).toEqual([kind, 400]);
      if (r.statusCode === 200) return;
      seen.set(kind, (seen.get(kind) ?? 0) + 1);
      expect([kind, r.statusCode]).toEqual([kind, 400]);
      expect(body.statusCode).toBe(400);
      // the field: weights (the file), and for an entry its name
      expect(body.message).toMatch(
        /^weights: (upload: (file too short|bad header length|header |entry "|entries ")|loadStateDict: )/,
      );
    });
    await fc.assert(property, { numRuns: Math.ceil(RUNS / 3), seed: 11 });
    const tensors = tf.memory().numTensors;
    const before = settledMemory();
    await fc.assert(property, { numRuns: RUNS, seed: 12 });
    const after = settledMemory();
    report('weights uploads', before, after);
    // every kind of damage was tried and refused
    expect([...seen.keys()].sort()).toEqual(
      [
        'entry data_offsets',
        'entry dtype',
        'entry shape',
        'extra entry',
        'header byte',
        'header length',
        'json header',
        'missing entry',
        'random bytes',
        'truncated',
      ].filter((k) => RUNS >= 100 || seen.has(k)),
    );
    // an upload's tensors are disposed whatever happens to it (exact)
    expect(tf.memory().numTensors).toBe(tensors);
    // a leak of one decoded model (~120 KiB) per request would add RUNS x 120 KiB; allow 8 MiB of
    // heap noise (compiled code, fast-check's shrinking state) and 64 MiB of RSS (allocator caches)
    expect(after.heap - before.heap).toBeLessThan(8 * MiB);
    expect(after.rss - before.rss).toBeLessThan(64 * MiB);
    expect((await env.app.inject({ method: 'GET', url: '/healthz' })).statusCode).toBe(200);
  });

  it('datasets: non-empty UTF-8 is stored, empty or invalid bodies are 400 naming the body, oversize 413', async () => {
    const utf8 = new TextDecoder('utf-8', { fatal: true });
    const isText = (b: Uint8Array) => {
      try {
        utf8.decode(b);
        return true;
      } catch {
        return false;
      }
    };
    const body = fc.oneof(
      fc.uint8Array({ maxLength: 64 }),
      fc.string({ unit: 'grapheme', maxLength: 64 }).map((s) => new TextEncoder().encode(s)),
      // valid text with a bad byte, a lone surrogate's encoding or an overlong form spliced in
      fc
        .tuple(
          fc.string({ maxLength: 40 }),
          fc.constantFrom([0xff], [0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xf4, 0x90, 0x80, 0x80], [0xe2, 0x82]),
          fc.string({ maxLength: 40 }),
        )
        .map(
          ([a, bad, b]) =>
            new Uint8Array([...new TextEncoder().encode(a), ...bad, ...new TextEncoder().encode(b)]),
        ),
      // one huge line, under or over the upload limit
      fc
        .integer({ min: UPLOAD_LIMIT - 4096, max: UPLOAD_LIMIT + 4096 })
        .map((n) => new Uint8Array(n).fill(0x61)),
      fc.constant(new Uint8Array(0)),
    );
    const type = fc.constantFrom('text/plain', 'application/octet-stream', 'multipart');
    const property = fc.asyncProperty(body, type, async (bytes, ct) => {
      const r =
        ct === 'multipart'
          ? await env.app.inject({
              method: 'POST',
              url: '/v1/datasets',
              headers: { 'content-type': 'multipart/form-data; boundary=XyZ' },
              payload: Buffer.concat([
                Buffer.from('--XyZ\r\ncontent-disposition: form-data; name="file"; filename="d.txt"\r\n\r\n'),
                Buffer.from(bytes),
                Buffer.from('\r\n--XyZ--\r\n'),
              ]),
            })
          : await env.app.inject({
              method: 'POST',
              url: '/v1/datasets',
              headers: { 'content-type': ct },
              payload: Buffer.from(bytes),
            });
      const res = r.json();
      const what = `${ct} ${bytes.length} bytes`;
      if (bytes.length > UPLOAD_LIMIT) {
        expect([what, r.statusCode]).toEqual([what, 413]);
        expect(res.message).toContain(`MAX_UPLOAD_BYTES=${UPLOAD_LIMIT}`);
      } else if (bytes.length === 0) {
        expect([what, r.statusCode]).toEqual([what, 400]);
        expect(res.message).toMatch(
          /^(body: expected non-empty text, got 0 bytes|file: expected a multipart file part)/,
        );
      } else if (!isText(bytes)) {
        expect([what, r.statusCode]).toEqual([what, 400]);
        expect(res.message).toMatch(/^body: expected UTF-8 text, got bytes [0-9a-f ]+ at byte \d+$/);
      } else {
        expect([what, r.statusCode]).toEqual([what, 201]);
        expect(res.bytes).toBe(bytes.length);
        expect((await env.app.inject({ method: 'DELETE', url: `/v1/datasets/${res.id}` })).statusCode).toBe(
          204,
        );
      }
    });
    await fc.assert(property, { numRuns: Math.ceil(RUNS / 3), seed: 13 });
    const before = settledMemory();
    await fc.assert(property, { numRuns: RUNS, seed: 14 });
    const after = settledMemory();
    report('dataset uploads', before, after);
    // a fifth of the bodies are ~1 MiB lines: keeping any of them would show at once
    expect(after.heap - before.heap).toBeLessThan(8 * MiB);
    expect(after.rss - before.rss).toBeLessThan(64 * MiB);
    expect((await env.app.inject({ method: 'GET', url: '/v1/datasets' })).json().datasets).toEqual([]);
  });
});
