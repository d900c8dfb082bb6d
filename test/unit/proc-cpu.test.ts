import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { describe, expect, it } from 'vitest';
import { clockTicksPerSecond, cpuBetween, procCpuAvailable, snapshotCpu } from '../../scripts/proc-cpu.js';

// bench:service --cpu's accounting, on a process tree shaped like the service's: a root process
// (the API) that starts a child whose command line names service/worker.ts; the root burns CPU on
// its main thread, the child on its main thread (the decode thread) and on a worker thread.

// Each burn runs until its own thread has used `ms` of CPU time (read from /proc/thread-self/stat),
// so that tests running beside it on a busy machine stretch its wall time, never its CPU figure.
const burn = (ms: number) =>
  `{ const fs = require('node:fs'); const cpu = () => { const t = fs.readFileSync('/proc/thread-self/stat', 'utf8'); const f = t.slice(t.lastIndexOf(')') + 2).split(' '); return Number(f[11]) + Number(f[12]); }; const hz = ${clockTicksPerSecond()}; const start = cpu(); let x = 0; while ((cpu() - start) / hz < ${ms / 1000}) for (let i = 0; i < 10000; i++) x++; }`;

const CHILD = `
const { Worker } = require('node:worker_threads');
process.stdin.once('data', async () => {
  const w = new Worker(${JSON.stringify(burn(400))} + ';', { eval: true });
  ${burn(400)}
  await new Promise((r) => w.once('exit', r));
  process.stdout.write('done');
});
process.stdin.once('end', () => process.exit(0)); // the root has gone
process.stdout.write('ready');
`;

const ROOT = `
const { spawn } = require('node:child_process');
const child = spawn(process.execPath, ['-e', ${JSON.stringify(CHILD)}, 'service/worker.ts'], { stdio: ['pipe', 'pipe', 'inherit'] });
child.stdout.once('data', () => process.stdout.write('ready'));
process.stdin.once('data', () => {
  ${burn(400)}
  child.stdout.once('data', () => process.stdout.write('done'));
  child.stdin.write('go');
});
`;

describe('bench:service --cpu accounting', () => {
  it.runIf(procCpuAvailable())(
    "splits a service's CPU into the API, the worker's decode thread and its other threads",
    async () => {
      const root = spawn(process.execPath, ['-e', ROOT], { stdio: ['pipe', 'pipe', 'inherit'] });
      try {
        await once(root.stdout, 'data'); // the child is up
        const before = snapshotCpu(root.pid!);
        root.stdin.write('go');
        await once(root.stdout, 'data');
        const used = cpuBetween(before, snapshotCpu(root.pid!));
        // each burned 0.4 s of its own CPU time
        for (const part of ['api', 'decode', 'workerOther'] as const) {
          expect(used[part], part).toBeGreaterThanOrEqual(0.35);
          expect(used[part], part).toBeLessThan(1.5);
        }
        expect(used.helpers).toBe(0);
        expect(used.redis).toBeNull(); // no redis-server below the root
      } finally {
        root.kill();
      }
    },
  );

  it('leaves out a part that either snapshot lacks', () => {
    const a = { api: 1, decode: 2, helpers: 0, workerOther: 1, redis: null };
    const b = { api: 1.5, decode: null, helpers: 0.25, workerOther: 1, redis: 3 };
    expect(cpuBetween(a, b)).toEqual({ api: 0.5, decode: null, helpers: 0.25, workerOther: 0, redis: null });
  });
});
