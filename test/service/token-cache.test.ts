import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, statSync, truncateSync, writeFileSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { createTokenizer } from '../../src/index.js';
import { Storage } from '../../models/storage.js';
import { TokenCache } from '../../workers/token-cache.js';
import { readTokenFile } from '../../workers/token-file.js';
import { pieceEnd } from '../../workers/tokenize-thread.js';
import { makeEnv, tinyDecoder, waitFor, type TestEnv } from './helpers.js';

// lines that stress pre-tokenization at piece ends: runs of spaces and newlines, digits,
// punctuation before newlines, non-Latin letters, an end-of-text string written as text
const LINES = [
  'The quick brown fox jumps over the lazy dog.',
  '  indented line with trailing spaces   ',
  '',
  'Numbers 1234567 and 3.14159, then punctuation!?\n\n',
  "It's what they'd've said; she'll see.",
  'Ünïcödé wörds, 漢字かな交じり文, emoji 🙂🚀 and <|endoftext|> in the text',
  '\ttabbed\r\ncarriage return',
  'x',
];
function corpus(lines: number): string {
  return Array.from({ length: lines }, (_, i) => `${LINES[i % LINES.length]} ${i % 7 ? '' : i}`).join('\n');
}

describe('dataset tokens: tokenized once per tokenizer, kept in DATA_DIR', () => {
  let dir: string;
  let storage: Storage;
  beforeAll(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'xt-tok-'));
    storage = new Storage(dir);
    mkdirSync(path.join(dir, 'datasets'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('pieces end after a newline that a letter follows', () => {
    const text = 'aaaa\n\nbbbb\n cccc\ndddd';
    expect(pieceEnd(text, 0, 2)).toBe(6); // after "aaaa\n\n": the next character is a letter
    expect(text[pieceEnd(text, 0, 7) - 1]).toBe('\n');
    expect(text.slice(pieceEnd(text, 0, 7))).toBe('dddd'); // "\n cccc" is passed over
    expect(pieceEnd(text, 0, 100)).toBe(text.length);
  });

  for (const name of ['byte', 'cl100k_base', 'o200k_base'] as const) {
    it(`${name}: the token file equals the tokenizer's output on the whole text; a second request reads it`, async () => {
      const id = randomUUID();
      const text = corpus(400);
      writeFileSync(storage.abs(storage.datasetFile(id)), text);
      const cache = new TokenCache(storage, 300); // many pieces
      const progress: number[] = [];
      const first = await cache.tokens(id, name, (p) => progress.push(p.progress));
      const expected = createTokenizer(name).encode(text);
      expect(first.cached).toBe(false);
      expect(Array.from(first.tokens)).toEqual(expected);
      expect(progress.length).toBeGreaterThan(5);
      expect(progress.at(-1)).toBe(1);
      expect(progress.every((p, i) => i === 0 || p > progress[i - 1]!)).toBe(true);

      const file = storage.abs(storage.tokensFile(id, name));
      const mtime = statSync(file).mtimeMs;
      const second = await cache.tokens(id, name);
      expect(second.cached).toBe(true);
      expect(cache.tokenizeRuns).toBe(1);
      expect(statSync(file).mtimeMs).toBe(mtime);
      expect(Array.from(second.tokens)).toEqual(expected);
    });
  }

  it('requests while a tokenization runs share it; a cut file is tokenized again', async () => {
    const id = randomUUID();
    const text = corpus(300);
    writeFileSync(storage.abs(storage.datasetFile(id)), text);
    const cache = new TokenCache(storage, 500);
    const [a, b] = await Promise.all([cache.tokens(id, 'cl100k_base'), cache.tokens(id, 'cl100k_base')]);
    expect(cache.tokenizeRuns).toBe(1);
    expect(Array.from(a.tokens)).toEqual(Array.from(b.tokens));

    const file = storage.abs(storage.tokensFile(id, 'cl100k_base'));
    truncateSync(file, statSync(file).size - 4);
    await expect(readTokenFile(file)).rejects.toThrow(/expected \d+ bytes for \d+ tokens, got \d+/);
    const again = await cache.tokens(id, 'cl100k_base');
    expect(again.cached).toBe(false);
    expect(cache.tokenizeRuns).toBe(2);
    expect(Array.from(again.tokens)).toEqual(Array.from(a.tokens));
    await expect(readTokenFile(file, 'byte')).rejects.toThrow(
      /expected tokens of tokenizer byte, got cl100k_base/,
    );
  });

  it('a dataset whose text is missing fails with the file named, and no token file is left', async () => {
    const id = randomUUID();
    const cache = new TokenCache(storage);
    await expect(cache.tokens(id, 'byte')).rejects.toThrow(new RegExp(`${id}\\.txt`));
    expect(() => statSync(storage.abs(storage.tokensFile(id, 'byte')))).toThrow(/ENOENT/);
  });
});

describe('training jobs read the cached tokens', () => {
  let env: TestEnv;
  beforeAll(async () => {
    env = await makeEnv({ workers: { tokenizePieceChars: 2000 } });
  });
  afterAll(async () => env?.close());

  it('the second job on the same dataset and tokenizer does not tokenize again', async () => {
    const m = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 't', config: tinyDecoder() },
    });
    expect(m.statusCode).toBe(201);
    const d = await env.app.inject({
      method: 'POST',
      url: '/v1/datasets?name=c',
      headers: { 'content-type': 'text/plain' },
      payload: corpus(600),
    });
    expect(d.statusCode).toBe(201);
    const datasetId = d.json().id as string;
    const run = async () => {
      const r = await env.app.inject({
        method: 'POST',
        url: `/v1/models/${m.json().id}/train`,
        payload: { datasetId, steps: 2, batchSize: 2, seqLen: 16 },
      });
      expect(r.statusCode).toBe(202);
      const jobId = r.json().jobId as string;
      await waitFor(
        async () => (await env.app.svc.registry.getJob(jobId))?.state === 'completed',
        60_000,
        'training completed',
      );
      return env.app.svc.registry.readEvents(jobId, '0');
    };
    const first = await run();
    const file = path.join(env.dataDir, 'datasets', `${datasetId}.byte.tokens`);
    const mtime = statSync(file).mtimeMs;
    const second = await run();

    const tokensOf = (evs: typeof first) => evs.find((e) => e.event === 'tokens')!.data;
    expect(first.filter((e) => e.event === 'tokenizing').length).toBeGreaterThan(0);
    expect(tokensOf(first)).toMatchObject({ tokenizer: 'byte', cached: false });
    expect(second.filter((e) => e.event === 'tokenizing')).toEqual([]);
    expect(tokensOf(second)).toMatchObject({ tokenizer: 'byte', cached: true, tokenizeMs: 0 });
    expect(tokensOf(second).tokens).toBe(Buffer.byteLength(corpus(600)));
    expect(env.workers!.ctx.tokens.tokenizeRuns).toBe(1);
    expect(statSync(file).mtimeMs).toBe(mtime);

    const del = await env.app.inject({ method: 'DELETE', url: `/v1/datasets/${datasetId}` });
    expect(del.statusCode).toBe(204);
    expect(() => statSync(file)).toThrow(/ENOENT/);
  });
});
