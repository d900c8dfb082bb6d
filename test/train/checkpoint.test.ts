import { mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { resolveCheckpointDir, writeDirAtomic } from '../../src/train/checkpoint.js';
import { Trainer, type TrainerOptions } from '../../src/train/trainer.js';
import { countingTokens, TinyLm } from './helpers.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'xt-ckpt-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const V = 12;
const data = { train: countingTokens(1500, V), val: countingTokens(300, V, 4) };
const opts: TrainerOptions = {
  totalSteps: 6,
  batchSize: 2,
  seqLen: 6,
  learningRate: 0.02,
  seed: 3,
  evalEvery: 2,
};

describe('checkpoints', () => {
  it('replaces a directory atomically and recovers from an interrupted swap', async () => {
    const dir = path.join(tmp, 'a');
    await writeDirAtomic(dir, { 'x.txt': 'one' });
    await writeDirAtomic(dir, { 'x.txt': 'two' });
    expect(readFileSync(path.join(dir, 'x.txt'), 'utf8')).toBe('two');
    expect(readdirSync(tmp).filter((n) => n.startsWith('a'))).toEqual(['a']);
    // a crash between the two renames leaves only <dir>.old-*: it is still found
    renameSync(dir, `${dir}.old-123-abcd`);
    expect(await resolveCheckpointDir(dir)).toBe(`${dir}.old-123-abcd`);
    await expect(resolveCheckpointDir(path.join(tmp, 'none'))).rejects.toThrow(/dir/);
  });

  it('detects a corrupted checkpoint and mismatched options', async () => {
    const m = new TinyLm(V, 6);
    const t = new Trainer(m, data, opts);
    t.step();
    const dir = path.join(tmp, 'b');
    await t.saveCheckpoint(dir);
    const m2 = new TinyLm(V, 6);
    await expect(Trainer.resume(m2, data, { ...opts, batchSize: 3 }, dir)).rejects.toThrow(/batchSize/);
    const f = path.join(dir, 'optimizer.safetensors');
    const bytes = readFileSync(f);
    bytes[bytes.length - 1] ^= 0xff;
    writeFileSync(f, bytes);
    await expect(Trainer.resume(m2, data, opts, dir)).rejects.toThrow(/checksum/);
    t.dispose();
    m.dispose();
    m2.dispose();
  });

  it('run() steps to totalSteps with step and eval callbacks, and stops on abort', async () => {
    const m = new TinyLm(V, 6);
    const t = new Trainer(m, data, opts);
    const steps: number[] = [];
    const evals: number[] = [];
    await t.run({ onStep: (r) => steps.push(r.step), onEval: (e) => evals.push(e.step) });
    expect(steps).toEqual([1, 2, 3, 4, 5, 6]);
    expect(evals).toEqual([2, 4, 6]);
    t.dispose();
    const t2 = new Trainer(m, data, opts);
    const ctl = new AbortController();
    await t2.run({ onStep: (r) => r.step === 2 && ctl.abort(), signal: ctl.signal });
    expect(t2.stepCount).toBe(2);
    t2.dispose();
    m.dispose();
  });
});
