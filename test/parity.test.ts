import { describe, expect, it } from 'vitest';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { listCases, runCase } from '../scripts/parity/run.js';

// Every visible reference case, one test each (the backend is chosen by test/setup.ts: XT_BACKEND).
const here = path.dirname(fileURLToPath(import.meta.url));
const dir = path.resolve(here, '..', '..', 'shared', 'parity', 'visible');
// PARITY_FILTER (a regular expression on the case file name) narrows the run while debugging.
const filter = process.env.PARITY_FILTER ? new RegExp(process.env.PARITY_FILTER) : null;
const files = listCases(dir).filter((f) => !filter || filter.test(path.basename(f)));

describe('parity with x-transformers 2.0.1', () => {
  it('finds the visible cases', () => {
    expect(files.length).toBeGreaterThan(0);
  });
  for (const file of files) {
    it(path.basename(file, '.safetensors'), async () => {
      const r = await runCase(file);
      expect(r.message ?? '', `${r.name} (${r.task}), worst abs error ${r.maxAbsErr}`).toBe('');
      expect(r.ok).toBe(true);
    });
  }
});
