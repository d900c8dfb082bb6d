import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Storage } from '../../models/storage.js';
import { createModelAndDataset, makeEnv, type TestEnv } from '../service/helpers.js';

/** Every file under `dir`, relative to it. */
function listFiles(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => path.relative(dir, path.join(e.parentPath, e.name)))
    .sort();
}

describe('ids cannot reach outside DATA_DIR (every route with an id)', () => {
  let env: TestEnv;
  let modelId = '';
  let datasetId = '';
  let outside = '';
  const SECRET = 'not for clients';
  beforeAll(async () => {
    env = await makeEnv();
    ({ modelId, datasetId } = await createModelAndDataset(env, 's', 'abc '.repeat(100)));
    // files beside DATA_DIR that a traversal would reach: a model folder and a dataset file
    outside = path.join(path.dirname(env.dataDir), `${path.basename(env.dataDir)}-outside`);
    mkdirSync(path.join(outside, 'models', 'victim'), { recursive: true });
    writeFileSync(path.join(outside, 'models', 'victim', 'initial.safetensors'), SECRET);
    writeFileSync(path.join(outside, 'victim.txt'), SECRET);
  });
  afterAll(async () => {
    rmSync(outside, { recursive: true, force: true });
    await env?.close();
  });

  it('answers 4xx to traversal ids, touches nothing outside DATA_DIR and nothing inside it', async () => {
    const rel = path.relative(path.join(env.dataDir, 'models'), outside);
    const ids = [
      '..',
      '.',
      '../..',
      '%2e%2e',
      '%2E%2E%2F%2E%2E',
      '..%2f..%2fetc%2fpasswd',
      '%2e%2e%2f' + encodeURIComponent(path.basename(outside)) + '%2fvictim',
      encodeURIComponent(`${rel}/models/victim`),
      encodeURIComponent(path.join(outside, 'models', 'victim')),
      encodeURIComponent('/etc/passwd'),
      '..%5c..%5cwindows',
      'a%00b',
      '%00',
      encodeURIComponent(`${modelId}\0`),
      encodeURIComponent(`${modelId}/../${modelId}`),
      encodeURIComponent(`${modelId}:jobs`),
      encodeURIComponent(`${datasetId}:x`),
      modelId.toUpperCase(),
    ];
    const doc = env.app.swagger() as { paths: Record<string, Record<string, unknown>> };
    const routes = Object.entries(doc.paths)
      .filter(([p]) => p.includes('{id}'))
      .flatMap(([p, methods]) => Object.keys(methods).map((m) => [m.toUpperCase(), p] as const));
    expect(routes.length).toBeGreaterThanOrEqual(9);
    const before = listFiles(env.dataDir);
    let requests = 0;
    for (const [method, p] of routes) {
      for (const id of ids) {
        const url = p.replace('{id}', id);
        const payload =
          method === 'PUT'
            ? { headers: { 'content-type': 'application/octet-stream' }, payload: Buffer.from('x') }
            : method === 'POST'
              ? p.endsWith('/train')
                ? { payload: { datasetId, steps: 1 } }
                : { payload: { prompt: 'a', maxTokens: 1 } }
              : {};
        const r = await env.app.inject({ method: method as 'GET', url, ...payload });
        requests++;
        // a client resolves the dot segments of `/v1/models/../..` to `/`: the dashboard's page, no data
        if (method === 'GET' && new URL(url, 'http://h').pathname === '/') {
          expect([method, url, r.statusCode, r.headers['content-type']]).toEqual([
            method,
            url,
            200,
            'text/html; charset=utf-8',
          ]);
          continue;
        }
        expect([method, url, r.statusCode]).toEqual([method, url, 404]);
        expect(r.json()).toMatchObject({ statusCode: 404, error: 'Not Found' });
      }
    }
    // the dataset id of a training request is an id too
    for (const id of ids) {
      const r = await env.app.inject({
        method: 'POST',
        url: `/v1/models/${modelId}/train`,
        payload: { datasetId: decodeURIComponent(id), steps: 1 },
      });
      requests++;
      expect([id, r.statusCode]).toEqual([id, 404]);
      expect(r.json().message).toMatch(/^dataset .* not found$/);
    }
    expect(requests).toBeGreaterThan(150);
    // nothing outside was read out or removed, nothing inside changed
    expect(readFileSync(path.join(outside, 'models', 'victim', 'initial.safetensors'), 'utf8')).toBe(SECRET);
    expect(readFileSync(path.join(outside, 'victim.txt'), 'utf8')).toBe(SECRET);
    expect(listFiles(env.dataDir)).toEqual(before);
    expect((await env.app.inject({ method: 'GET', url: `/v1/models/${modelId}` })).statusCode).toBe(200);
    expect((await env.app.inject({ method: 'GET', url: '/v1/datasets' })).json().datasets).toHaveLength(1);
  });

  it('storage refuses paths that are not plain ids, naming the argument', () => {
    const s = new Storage(env.dataDir);
    expect(() => s.datasetFile('../x')).toThrow(
      'datasetId: expected an id the service gave out (a UUID), got "../x"',
    );
    expect(() => s.weightsFile('/etc', 'initial')).toThrow('modelId: expected an id the service gave out');
    expect(() => s.weightsFile(modelId, '../../x')).toThrow(
      'version: expected letters, digits and -, got "../../x"',
    );
    expect(() => s.checkpointDir(modelId, 'a\0b', 1)).toThrow('jobId: expected an id the service gave out');
    expect(() => s.abs('../outside')).toThrow('path: expected a file under DATA_DIR, got "../outside"');
    expect(() => s.abs('datasets/a\0.txt')).toThrow('path: expected no NUL byte');
    expect(s.datasetFile(datasetId)).toBe(path.join('datasets', `${datasetId}.txt`));
    expect(existsSync(s.abs(s.datasetFile(datasetId)))).toBe(true);
  });
});

/**
 * Sends `preamble` and then `total` bytes in 64 KiB chunks (honouring backpressure), and resolves
 * with the answer and the bytes the client managed to write. It keeps writing after the answer: a
 * server that still read would take the rest; one that stopped makes the writes stall and fail.
 */
function streamUpload(
  url: string,
  opts: { method: string; headers: Record<string, string>; total: number; preamble?: string },
): Promise<{ status: number; body: string; written: number; closedAfterMs: number }> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: opts.method, headers: opts.headers });
    if (opts.preamble) req.write(opts.preamble);
    const chunk = Buffer.alloc(64 * 1024, 0x61);
    let written = 0;
    let answer: { status: number; body: string } | null = null;
    let answeredAt = 0;
    let pumping = true;
    let finished = false;
    const done = () => {
      if (finished || !answer) return;
      finished = true;
      resolve({ ...answer, written, closedAfterMs: Date.now() - answeredAt });
    };
    req.on('response', (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => {
        answer = { status: res.statusCode ?? 0, body };
        answeredAt = Date.now();
        if (!pumping) done();
      });
    });
    req.on('error', (e) => (answer ? done() : reject(e)));
    req.on('close', () => done());
    const pump = () => {
      while (written < opts.total) {
        if (req.destroyed) return;
        written += chunk.length;
        if (!req.write(chunk)) {
          req.once('drain', pump);
          return;
        }
      }
      pumping = false;
      req.end();
      done();
    };
    pump();
  });
}

describe('bodies over their limit are refused before they are read', () => {
  let env: TestEnv;
  let base = '';
  const UPLOAD = 256 * 1024;
  const BODY = 4096;
  const TOTAL = 512 * 1024 * 1024;
  beforeAll(async () => {
    env = await makeEnv({ app: { limits: { maxUploadBytes: UPLOAD, maxBodyBytes: BODY } } });
    base = await env.app.listen({ port: 0, host: '127.0.0.1' });
  });
  afterAll(async () => env?.close());

  const cases: [string, string, Record<string, string>, string][] = [
    [
      'a streamed text upload',
      '/v1/datasets',
      { 'content-type': 'text/plain' },
      `MAX_UPLOAD_BYTES=${UPLOAD}`,
    ],
    [
      'a streamed weights upload',
      '/v1/models/00000000-0000-4000-8000-000000000000/weights',
      { 'content-type': 'application/octet-stream' },
      `MAX_UPLOAD_BYTES=${UPLOAD}`,
    ],
    ['a streamed JSON body', '/v1/models', { 'content-type': 'application/json' }, `MAX_BODY_BYTES=${BODY}`],
    [
      'a declared length over the limit',
      '/v1/datasets',
      { 'content-type': 'text/plain', 'content-length': String(TOTAL) },
      `MAX_UPLOAD_BYTES=${UPLOAD}`,
    ],
    [
      'a streamed multipart file',
      '/v1/datasets',
      { 'content-type': 'multipart/form-data; boundary=B' },
      `MAX_UPLOAD_BYTES=${UPLOAD}`,
    ],
  ];

  for (const [what, url, headers, limit] of cases) {
    it(`${what}: 413 naming ${limit.split('=')[0]}, and the rest of the ${TOTAL / 2 ** 20} MiB is never read`, async () => {
      const method = url.endsWith('/weights') ? 'PUT' : 'POST';
      const multipart = headers['content-type']!.startsWith('multipart/');
      const r = await streamUpload(`${base}${url}`, {
        method,
        headers,
        total: TOTAL,
        preamble: multipart
          ? '--B\r\ncontent-disposition: form-data; name="file"; filename="d.txt"\r\n\r\n'
          : '',
      });
      expect(r.status, r.body).toBe(413);
      expect(JSON.parse(r.body)).toMatchObject({ statusCode: 413, error: 'Payload Too Large' });
      expect(JSON.parse(r.body).message).toContain(limit);
      // the server read at most the limit plus what sockets buffer (a few MiB on loopback), then
      // closed the connection: the client could not write the rest
      console.log(
        `${what}: ${r.status} after the client wrote ${(r.written / 2 ** 20).toFixed(1)} MiB of ${TOTAL / 2 ** 20} MiB`,
      );
      expect(r.written).toBeLessThan(64 * 1024 * 1024);
      // and it closed the connection with its answer (not at a timeout a minute later)
      expect(r.closedAfterMs).toBeLessThan(10_000);
      expect((await fetch(`${base}/healthz`)).status).toBe(200);
    });
  }
});
