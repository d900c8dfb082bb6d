import { describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs-core';
import { saveSafetensors } from '../../src/io/safetensors.js';
import { PARITY_CASES } from '../../scripts/parity/paths.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const visible = PARITY_CASES;

// the child is a plain Node process: drop the test runner's own environment markers
const childEnv = Object.fromEntries(
  Object.entries(process.env).filter(([k]) => !k.startsWith('VITEST') && k !== 'NODE_OPTIONS'),
);

function runCli(dir: string): { code: number | null; lines: string[] } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'scripts/parity.ts', dir], {
    cwd: root,
    encoding: 'utf8',
    env: { ...childEnv, XT_BACKEND: 'cpu' },
  });
  return { code: r.status, lines: r.stdout.trim().split('\n') };
}

describe('npm run parity', () => {
  it('fails when the folder holds no case', () => {
    const r = runCli(mkdtempSync(path.join(os.tmpdir(), 'parity-empty-')));
    expect(r.code).not.toBe(0);
    expect(r.lines.at(-1)).toBe('parity: 0 passed, 0 failed');
  });

  it('prints one line per case and exits non-zero when one fails', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'parity-cli-'));
    copyFileSync(path.join(visible, 'sampling_filters.safetensors'), path.join(dir, 'a.safetensors'));
    const t = tf.tensor([1]);
    const bytes = saveSafetensors(
      { 'output.y': t },
      { case: JSON.stringify({ name: 'b', task: 'nope', spec: null }) },
    );
    t.dispose();
    writeFileSync(path.join(dir, 'b.safetensors'), bytes);
    const r = runCli(dir);
    expect(r.code).not.toBe(0);
    expect(r.lines.at(-1)).toBe('parity: 1 passed, 1 failed');
    expect(r.lines.at(-3)).toMatch(/^sampling_filters\s+filters\s+\S+\s+PASS/);
    expect(r.lines.at(-2)).toMatch(/^b\s+nope\s+-\s+FAIL no runner for task nope$/);
  });

  it('exits 0 when every case passes', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'parity-ok-'));
    copyFileSync(path.join(visible, 'sampling_filters.safetensors'), path.join(dir, 'a.safetensors'));
    const r = runCli(dir);
    expect(r.code).toBe(0);
    expect(r.lines.at(-1)).toBe('parity: 1 passed, 0 failed');
  });
});
