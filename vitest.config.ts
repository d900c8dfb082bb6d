import os from 'node:os';
import { defineConfig } from 'vitest/config';

// Test files run in parallel worker processes; each LibTorch in them gets an equal share of the cores,
// so that together they never ask for more threads than the machine has.
const cores = os.availableParallelism();
const workers = Math.max(1, Math.min(2, cores));
const threadsPerWorker = String(Math.max(1, Math.floor(cores / workers)));

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    fileParallelism: true,
    maxWorkers: workers,
    env: { XT_NUM_THREADS: process.env.XT_NUM_THREADS ?? threadsPerWorker },
    setupFiles: ['test/setup.ts'],
    globalSetup: ['test/service/global-setup.ts'],
  },
});
