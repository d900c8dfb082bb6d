import { spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../service/config.js';
import { allowedCpus, formatCpuList, parseCpuList, planCpus, setAffinity } from '../../service/cpus.js';

describe('CPU lists', () => {
  it('reads and writes the kernel format', () => {
    expect(parseCpuList('0')).toEqual([0]);
    expect(parseCpuList('0-3,8,10-11\n')).toEqual([0, 1, 2, 3, 8, 10, 11]);
    expect(parseCpuList('5,1-2,2')).toEqual([1, 2, 5]);
    expect(formatCpuList([0, 1, 2, 3, 8, 10, 11])).toBe('0-3,8,10-11');
    expect(formatCpuList([3, 1, 2, 1])).toBe('1-3');
    expect(formatCpuList([4])).toBe('4');
    expect(formatCpuList([0, 2, 4])).toBe('0,2,4');
  });

  it('refuses what is not a CPU list, saying what came', () => {
    expect(() => parseCpuList('')).toThrow('got an empty string');
    expect(() => parseCpuList('0-a')).toThrow('got "0-a"');
    expect(() => parseCpuList('3-1')).toThrow('range 3-1 runs backwards');
  });
});

describe('the CPU kept for the worker (WORKER_CPU)', () => {
  it('keeps the last allowed CPU with auto, a named one, or none', () => {
    expect(planCpus('auto', [0, 1])).toEqual({ reserved: 1, others: [0], all: [0, 1] });
    expect(planCpus('auto', [2, 3, 6])).toEqual({ reserved: 6, others: [2, 3], all: [2, 3, 6] });
    expect(planCpus(2, [2, 3, 6])).toEqual({ reserved: 2, others: [3, 6], all: [2, 3, 6] });
    expect(planCpus('off', [0, 1])).toBeNull();
    // one CPU: nothing to keep; no /proc: nothing known
    expect(planCpus('auto', [0])).toBeNull();
    expect(planCpus(0, [0])).toBeNull();
    expect(planCpus('auto', null)).toBeNull();
  });

  it('refuses a CPU this process may not use, listing those it may', () => {
    expect(() => planCpus(4, [0, 1])).toThrow(
      'WORKER_CPU: expected auto, off or one of the CPUs this process may use (0-1), got 4',
    );
  });

  it('is read from the environment: auto by default, off, or a number', () => {
    expect(loadConfig({}).workerCpu).toBe('auto');
    expect(loadConfig({ WORKER_CPU: 'OFF' }).workerCpu).toBe('off');
    expect(loadConfig({ WORKER_CPU: ' 3 ' }).workerCpu).toBe(3);
    expect(() => loadConfig({ WORKER_CPU: 'last' })).toThrow(ConfigError);
    expect(() => loadConfig({ WORKER_CPU: '-1' })).toThrow(
      'WORKER_CPU: expected auto, off or a CPU number, got "-1"',
    );
  });
});

describe.runIf(process.platform === 'linux')('affinity (Linux)', () => {
  it("reads a thread's CPUs from /proc and sets a process's with taskset", async () => {
    const mine = allowedCpus();
    expect(mine).not.toBeNull();
    expect(mine!.length).toBeGreaterThan(0);
    const child = spawn('sleep', ['30'], { stdio: 'ignore' });
    try {
      await new Promise((r) => child.once('spawn', r));
      const pid = child.pid!;
      // a child starts with its parent's CPUs
      expect(allowedCpus(pid)).toEqual(mine);
      const first = [mine![0]!];
      expect(setAffinity(pid, first, true)).toBeNull();
      expect(allowedCpus(pid)).toEqual(first);
      expect(setAffinity(pid, mine!, false)).toBeNull();
      expect(allowedCpus(pid)).toEqual(mine);
      // a CPU the machine does not have: taskset's refusal comes back as the reason
      expect(setAffinity(pid, [100_000], false)).toMatch(/^taskset -p -c 100000 \d+ exited with \d+/);
    } finally {
      child.kill('SIGKILL');
    }
    expect(allowedCpus(2 ** 22 + 12345)).toBeNull();
  });
});
