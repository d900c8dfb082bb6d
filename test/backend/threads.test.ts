import os from 'node:os';
import { describe, expect, it } from 'vitest';
import { registerTorchBackend } from '../../src/backend/torch/register.js';

describe('test processes and LibTorch threads', () => {
  it('together ask for at most the machine’s cores', () => {
    const cores = os.availableParallelism();
    // vitest.config.ts gives every test worker process an equal share
    const r = registerTorchBackend();
    const threads = r.ok ? r.threads : 1;
    expect(threads).toBe(Number(process.env.XT_NUM_THREADS));
    expect(threads * Math.min(2, cores)).toBeLessThanOrEqual(Math.max(cores, 2));
  });
});
