import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { compareTensors } from '../../scripts/parity/compare.js';
import { formatResult, listCases, runCase } from '../../scripts/parity/run.js';
import { saveSafetensors } from '../../src/io/safetensors.js';
import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

describe('compareTensors', () => {
  it('accepts values within atol + rtol and reports the worst error', () => {
    const e = tf.tensor([1, 100, -3]);
    const a = tf.tensor([1 + 5e-5, 100 + 0.05, -3]);
    const r = compareTensors('output.x', a, e);
    expect(r.ok).toBe(true);
    expect(r.maxAbsErr).toBeCloseTo(0.05, 3);
    tf.dispose([a, e]);
  });
  it('rejects values outside the tolerance, naming the first element', () => {
    const e = tf.tensor([
      [1, 2],
      [3, 4],
    ]);
    const a = tf.tensor([
      [1, 2],
      [3, 4.01],
    ]);
    const r = compareTensors('output.x', a, e);
    expect(r.ok).toBe(false);
    expect(r.message).toMatch(/output\.x: 1 of 4 .*\[1, 1\]/);
    tf.dispose([a, e]);
  });
  it('needs -inf exactly where the reference has -inf', () => {
    const e = tf.tensor([-Infinity, 1]);
    const same = tf.tensor([-Infinity, 1]);
    const finite = tf.tensor([-1e30, 1]);
    expect(compareTensors('o', same, e).ok).toBe(true);
    expect(compareTensors('o', finite, e).ok).toBe(false);
    expect(compareTensors('o', e, finite).ok).toBe(false);
    tf.dispose([e, same, finite]);
  });
  it('compares tokens exactly and checks shapes', () => {
    const e = tf.tensor([1, 2, 3], [3], 'int32');
    const off = tf.tensor([1, 2, 4], [3], 'int32');
    const wrong = tf.tensor([1, 2], [2], 'int32');
    expect(compareTensors('t', e, e).ok).toBe(true);
    expect(compareTensors('t', off, e).ok).toBe(false);
    expect(compareTensors('t', wrong, e).message).toMatch(/shape \[2\], expected \[3\]/);
    tf.dispose([e, off, wrong]);
  });
});

describe('runCase', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'parity-'));
  const write = (name: string, task: string): string => {
    const t = tf.tensor([1, 2]);
    const bytes = saveSafetensors(
      { 'output.y': t },
      { case: JSON.stringify({ name, task, spec: null, seed: 0, reference: 'test' }) },
    );
    t.dispose();
    const f = path.join(dir, `${name}.safetensors`);
    writeFileSync(f, bytes);
    return f;
  };
  it('fails a case of an unregistered task with "no runner for task X"', async () => {
    const r = await runCase(write('b_case', 'no_such_task'));
    expect(r.ok).toBe(false);
    expect(r.message).toBe('no runner for task no_such_task');
    expect(formatResult(r)).toMatch(/b_case\s+no_such_task\s+-\s+FAIL no runner for task no_such_task/);
  });
  it('fails an unreadable file with its message, and lists cases sorted', async () => {
    writeFileSync(path.join(dir, 'a_bad.safetensors'), new Uint8Array([1, 2, 3]));
    const files = listCases(dir);
    expect(files.map((f) => path.basename(f))).toEqual([...files.map((f) => path.basename(f))].sort());
    const r = await runCase(path.join(dir, 'a_bad.safetensors'));
    expect(r.ok).toBe(false);
    expect(r.message).toMatch(/file too short/);
  });
});
