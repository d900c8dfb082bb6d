import { readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';

/**
 * CPU affinity for `npm start` on Linux: the API, the private Redis and the worker's background
 * threads keep off one CPU, so that the worker's compute thread (its main thread: decoding steps and
 * training steps) is not preempted by them there. The compute thread itself may still run on every
 * CPU (and the threads it starts later, the helper threads and ATen's pool, with it).
 */

/** `WORKER_CPU`: `auto` (the last CPU this process may use, where it may use two or more), `off`, or a CPU number. */
export type WorkerCpuSetting = 'auto' | 'off' | number;

/** Parses a kernel CPU list (`0-3,8,10-11`) into sorted CPU numbers; throws on anything else. */
export function parseCpuList(text: string): number[] {
  const cpus = new Set<number>();
  const trimmed = text.trim();
  if (!trimmed) throw new Error('a CPU list: expected numbers and ranges such as 0-3,8, got an empty string');
  for (const part of trimmed.split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (!m) throw new Error(`a CPU list: expected numbers and ranges such as 0-3,8, got "${text}"`);
    const from = Number(m[1]);
    const to = m[2] === undefined ? from : Number(m[2]);
    if (to < from) throw new Error(`a CPU list: range ${part.trim()} runs backwards in "${text}"`);
    for (let c = from; c <= to; c++) cpus.add(c);
  }
  return [...cpus].sort((a, b) => a - b);
}

/** Formats CPU numbers as a kernel CPU list (`0-3,8`), as `taskset -c` takes it. */
export function formatCpuList(cpus: readonly number[]): string {
  const sorted = [...new Set(cpus)].sort((a, b) => a - b);
  const parts: string[] = [];
  for (let i = 0; i < sorted.length;) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j]! + 1) j++;
    parts.push(i === j ? `${sorted[i]}` : `${sorted[i]}-${sorted[j]}`);
    i = j + 1;
  }
  return parts.join(',');
}

/**
 * The CPUs a thread may run on (its `Cpus_allowed_list` under /proc), or null where /proc does not
 * say (not Linux). `tid` defaults to this process's main thread.
 */
export function allowedCpus(pid: number = process.pid, tid: number = pid): number[] | null {
  let status: string;
  try {
    status = readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
  } catch {
    return null;
  }
  const line = /^Cpus_allowed_list:\s*(.*)$/m.exec(status);
  return line ? parseCpuList(line[1]!) : null;
}

/** The CPU kept for the worker's compute thread, and the others (for everything else), or null: nothing to keep. */
export interface CpuPlan {
  reserved: number;
  others: number[];
  all: number[];
}

/**
 * Which CPU to keep for the compute thread among `allowed`: none with `off` or fewer than two CPUs;
 * the last with `auto`; else the one named, which must be allowed (an Error says which are).
 */
export function planCpus(setting: WorkerCpuSetting, allowed: readonly number[] | null): CpuPlan | null {
  if (setting === 'off' || !allowed) return null;
  if (typeof setting === 'number' && !allowed.includes(setting))
    throw new Error(
      `WORKER_CPU: expected auto, off or one of the CPUs this process may use (${formatCpuList(allowed)}), got ${setting}`,
    );
  if (allowed.length < 2) return null;
  const reserved = setting === 'auto' ? allowed[allowed.length - 1]! : setting;
  return { reserved, others: allowed.filter((c) => c !== reserved), all: [...allowed] };
}

/**
 * Sets the CPUs of process `pid`'s threads with util-linux `taskset`: every thread it has now with
 * `allThreads`, else only the thread whose id is `pid` (a process's main thread). Threads started
 * later take the affinity of the thread that starts them. Returns null when it took, else why not.
 */
export function setAffinity(pid: number, cpus: readonly number[], allThreads: boolean): string | null {
  const args = [...(allThreads ? ['-a'] : []), '-p', '-c', formatCpuList(cpus), String(pid)];
  const r = spawnSync('taskset', args, { encoding: 'utf8' });
  if (r.error) return `taskset: ${r.error.message}`;
  if (r.status !== 0) return `taskset ${args.join(' ')} exited with ${r.status}: ${r.stderr.trim()}`;
  return null;
}
