import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

// oneDNN's sgemm kernels (float32 products on the torch backend) can point the stack register into
// the heap while they run; a signal handled there writes its frame over the heap. The backend keeps
// signals pending during such a product and off OpenMP's threads: a process whose products are
// interrupted by V8's sampler (--cpu-prof, SIGPROF every 100 us to the JavaScript thread) and by
// signals sent to the process (SIGUSR2, with a handler) runs to its end with the right numbers.

const CHILD = fileURLToPath(new URL('./children/products-under-signals.ts', import.meta.url));

describe('torch backend under signals', () => {
  it.runIf(process.platform === 'linux')(
    "OpenMP's threads, which run parts of oneDNN's kernels, block asynchronous signals",
    () => {
      const blocking = (threads: number) => {
        const r = spawnSync(process.execPath, ['--import', 'tsx', CHILD, 'masks'], {
          env: { ...process.env, XT_NUM_THREADS: String(threads) },
          encoding: 'utf8',
        });
        expect(r.status, r.stderr).toBe(0);
        return (JSON.parse(r.stdout.trim().split('\n').pop()!) as { blocking: number }).blocking;
      };
      // two more OpenMP threads, each blocking them; the thread that calls the kernels does not
      expect(blocking(3) - blocking(1)).toBe(2);
    },
  );

  it.runIf(process.platform !== 'win32')(
    "float32 products are not corrupted by signals that arrive while oneDNN's kernels run",
    async () => {
      const dir = mkdtempSync(path.join(os.tmpdir(), 'xt-signals-'));
      const child = spawn(
        process.execPath,
        [
          '--cpu-prof',
          '--cpu-prof-interval',
          '100',
          `--cpu-prof-dir=${dir}`,
          '--import',
          'tsx',
          CHILD,
          '3000',
        ],
        // two OpenMP threads: a signal sent to the process may be taken by either
        { env: { ...process.env, XT_NUM_THREADS: '2' }, stdio: ['pipe', 'pipe', 'pipe'] },
      );
      let out = '';
      let err = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
      let timer: NodeJS.Timeout | undefined;
      try {
        const exited = once(child, 'exit');
        // signals once its handler is installed
        while (!out.includes('ready\n') && child.exitCode === null && child.signalCode === null)
          await new Promise((r) => setTimeout(r, 20));
        timer = setInterval(() => child.kill('SIGUSR2'), 2);
        // until its result (or its end)
        while (!out.includes('}') && child.exitCode === null && child.signalCode === null)
          await new Promise((r) => setTimeout(r, 20));
        clearInterval(timer);
        child.stdin.end();
        const [code, signal] = await exited;
        expect({ code, signal }, err).toEqual({ code: 0, signal: null });
        const result = JSON.parse(out.trim().split('\n').pop()!) as {
          products: number;
          signals: number;
          same: boolean;
        };
        expect(result.same).toBe(true);
        expect(result.signals).toBeGreaterThan(0);
      } finally {
        clearInterval(timer);
        child.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    },
  );
});
