/**
 * CPU time of the service's processes, read from Linux's /proc: the API (the `npm start` process),
 * the worker it starts (its decode thread, the addon's xt-helper threads, and its other threads:
 * the garbage collector, compilers, I/O), and the private Redis. `bench:service --cpu` takes a
 * snapshot before and after each level to say where each token's CPU goes.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';

/** The parts a snapshot splits the service's CPU into, in report order. */
export const CPU_PARTS = ['api', 'decode', 'helpers', 'workerOther', 'redis'] as const;
export type CpuPart = (typeof CPU_PARTS)[number];

/** CPU seconds used so far by each part (null: no such process found). */
export type CpuSnapshot = Record<CpuPart, number | null>;

let ticksPerSecond: number | null = null;
/** The kernel's clock ticks per second, the unit of /proc's CPU times. */
export function clockTicksPerSecond(): number {
  if (ticksPerSecond === null) {
    try {
      ticksPerSecond = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      ticksPerSecond = 100;
    }
  }
  return ticksPerSecond;
}

/** Fields of a /proc stat line after the command name (which may hold spaces and parentheses). */
function statFields(path: string): string[] | null {
  try {
    const text = readFileSync(path, 'utf8');
    return text.slice(text.lastIndexOf(')') + 2).split(' ');
  } catch {
    return null; // gone meanwhile
  }
}

/** User plus system CPU seconds of a process or thread's stat file. */
function cpuSeconds(path: string): number | null {
  const f = statFields(path);
  // after the name: state, ppid, ... utime is the 12th field, stime the 13th
  return f ? (Number(f[11]) + Number(f[12])) / clockTicksPerSecond() : null;
}

function readText(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

/** Whether this machine has the /proc files a snapshot reads. */
export function procCpuAvailable(): boolean {
  return process.platform === 'linux' && existsSync(`/proc/${process.pid}/task`);
}

/** The processes below `root`, each with its command name and command line. */
export function descendants(root: number): { pid: number; comm: string; cmdline: string }[] {
  const parent = new Map<number, number>();
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const f = statFields(`/proc/${name}/stat`);
    if (f) parent.set(Number(name), Number(f[1]));
  }
  const out: { pid: number; comm: string; cmdline: string }[] = [];
  for (const pid of parent.keys()) {
    let p: number | undefined = parent.get(pid);
    while (p !== undefined && p !== root && p > 1) p = parent.get(p);
    if (p === root)
      out.push({
        pid,
        comm: readText(`/proc/${pid}/comm`).trim(),
        cmdline: readText(`/proc/${pid}/cmdline`).replaceAll('\0', ' '),
      });
  }
  return out;
}

/** CPU seconds used so far by the service started as process `root` (the API), split by part. */
export function snapshotCpu(root: number): CpuSnapshot {
  const snap: CpuSnapshot = {
    api: cpuSeconds(`/proc/${root}/stat`),
    decode: null,
    helpers: null,
    workerOther: null,
    redis: null,
  };
  for (const p of descendants(root)) {
    if (p.comm === 'redis-server') snap.redis = (snap.redis ?? 0) + (cpuSeconds(`/proc/${p.pid}/stat`) ?? 0);
    if (!p.cmdline.includes('service/worker.ts')) continue;
    // the process's own figure counts its threads that have exited too; what is not the decode
    // thread's or a helper's is the other threads'
    const total = cpuSeconds(`/proc/${p.pid}/stat`);
    if (total === null) continue;
    let decode = 0;
    let helpers = 0;
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${p.pid}/task`);
    } catch {
      continue; // gone meanwhile
    }
    for (const tid of tids) {
      const s = cpuSeconds(`/proc/${p.pid}/task/${tid}/stat`) ?? 0;
      if (Number(tid) === p.pid) decode += s;
      else if (readText(`/proc/${p.pid}/task/${tid}/comm`).trim() === 'xt-helper') helpers += s;
    }
    snap.decode = (snap.decode ?? 0) + decode;
    snap.helpers = (snap.helpers ?? 0) + helpers;
    snap.workerOther = (snap.workerOther ?? 0) + Math.max(0, total - decode - helpers);
  }
  return snap;
}

/** What each part used between two snapshots (null where a part was missing from either). */
export function cpuBetween(a: CpuSnapshot, b: CpuSnapshot): CpuSnapshot {
  const out = {} as CpuSnapshot;
  for (const k of CPU_PARTS) {
    const x = a[k];
    const y = b[k];
    out[k] = x === null || y === null ? null : Math.max(0, y - x);
  }
  return out;
}
