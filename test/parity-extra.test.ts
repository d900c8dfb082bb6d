import { describe, expect, it } from 'vitest';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { listCases, runCase } from '../scripts/parity/run.js';

// More reference cases (x-transformers 2.0.1 on PyTorch, CPU, float32, eval), in the format of the
// visible set, on smaller models (dim 16, vocabulary 24): the fused attention path with masks, memory
// key/values, ALiBi and grouped heads; greedy generation with and without the cache for every
// attention-side positional scheme; Transformer-XL with short memories, memory tokens and uneven
// segments; gradients; and wrapper options the visible set does not combine. One test per case.
const here = path.dirname(fileURLToPath(import.meta.url));
const dir = path.resolve(here, 'fixtures', 'extra-parity');
// PARITY_FILTER (a regular expression on the case file name) narrows the run while debugging.
const filter = process.env.PARITY_FILTER ? new RegExp(process.env.PARITY_FILTER) : null;
const files = listCases(dir).filter((f) => !filter || filter.test(path.basename(f)));

describe('parity with x-transformers 2.0.1 (extra cases)', () => {
  it('finds the extra cases', () => {
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
