/**
 * Dataset tokens: the time to tokenize a dataset once (on the worker thread, into its token file)
 * and the time a training job then takes to load the cached tokens.
 *   npm run bench:tokens -- [--mb 16] [--tokenizer cl100k_base]
 * The text is generated English-like prose of the given size; figures for 256 MB are extrapolated
 * linearly from the measured size and printed as such.
 */
import { mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Rng } from '../src/index.js';
import { Storage } from '../models/storage.js';
import { TokenCache } from '../workers/token-cache.js';

const { values } = parseArgs({
  options: { mb: { type: 'string', default: '16' }, tokenizer: { type: 'string', default: 'cl100k_base' } },
});
const mb = Number(values.mb);
if (!(mb > 0)) throw new Error(`--mb: expected a positive number, got ${values.mb}`);
const tokenizer = values.tokenizer as 'byte' | 'cl100k_base' | 'o200k_base';

const WORDS =
  'the of and to in is was that for on with as by at from his her it an were are which this be or had not but have one all their they been has'.split(
    ' ',
  );
const rng = new Rng(1);
const parts: string[] = [];
let size = 0;
while (size < mb * 2 ** 20) {
  const n = 5 + Math.floor(rng.random() * 20);
  const words = Array.from({ length: n }, () => WORDS[Math.floor(rng.random() * WORDS.length)]!);
  const line = `${words.join(' ')}${rng.random() < 0.3 ? `, ${Math.floor(rng.random() * 10000)}` : ''}.\n`;
  parts.push(line[0]!.toUpperCase() + line.slice(1));
  size += line.length;
}
const dir = mkdtempSync(path.join(os.tmpdir(), 'xt-bench-tokens-'));
try {
  mkdirSync(path.join(dir, 'datasets'));
  const storage = new Storage(dir);
  const id = '00000000-0000-4000-8000-000000000000';
  writeFileSync(storage.abs(storage.datasetFile(id)), parts.join(''));
  const bytes = statSync(storage.abs(storage.datasetFile(id))).size;
  const cache = new TokenCache(storage);
  const first = await cache.tokens(id, tokenizer);
  const second = await cache.tokens(id, tokenizer);
  const scale = 256 / (bytes / 2 ** 20);
  const rows = {
    tokenizer,
    textMB: +(bytes / 2 ** 20).toFixed(1),
    tokens: first.tokens.length,
    tokenizeSeconds: +(first.tokenizeMs / 1000).toFixed(2),
    tokenizeMBps: +(bytes / 2 ** 20 / (first.tokenizeMs / 1000)).toFixed(2),
    cachedLoadMs: +second.loadMs.toFixed(1),
    extrapolatedTo256MB: {
      tokenizeSeconds: +((first.tokenizeMs / 1000) * scale).toFixed(0),
      cachedLoadMs: +(second.loadMs * scale).toFixed(0),
    },
  };
  console.log(JSON.stringify(rows, null, 2));
} finally {
  rmSync(dir, { recursive: true, force: true });
}
