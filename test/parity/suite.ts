import { describe, expect, it } from 'vitest';
import path from 'node:path';
import { listCases, runCase } from '../../scripts/parity/run.js';

/**
 * Declares one vitest test per reference case in `dir` (the backend is chosen by test/setup.ts:
 * XT_BACKEND), plus one that fails when the folder holds no case. PARITY_FILTER (a regular
 * expression on the case file name) narrows the run while debugging.
 */
export function paritySuite(title: string, dir: string): void {
  const filter = process.env.PARITY_FILTER ? new RegExp(process.env.PARITY_FILTER) : null;
  const files = listCases(dir).filter((f) => !filter || filter.test(path.basename(f)));
  describe(title, () => {
    it(`finds the cases in ${dir}`, () => {
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
}
