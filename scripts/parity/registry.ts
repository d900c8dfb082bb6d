import { readdirSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import path from 'node:path';
import type { ParityCase } from './case.js';
import type { Comparison } from './compare.js';

/**
 * A task runner: runs the case's model (or function) as the task describes and returns one
 * comparison per expected output. It must dispose every tensor it creates; the case's own tensors
 * are disposed by the caller.
 */
export type TaskRunner = (c: ParityCase) => Promise<Comparison[]>;

const runners = new Map<string, TaskRunner>();
const loadErrors = new Map<string, string>();
let loaded: Promise<void> | null = null;

/** Registers the runner of `task` (one call per task file in scripts/parity/tasks/). */
export function registerTask(task: string, runner: TaskRunner): void {
  if (runners.has(task)) throw new Error(`registerTask: task "${task}" is already registered`);
  runners.set(task, runner);
}

/** Tasks registered so far. */
export function registeredTasks(): string[] {
  return [...runners.keys()].sort();
}

/**
 * Imports every task file in scripts/parity/tasks/ once. A file that fails to import (for example
 * because a module it needs does not exist yet) is remembered, and its task fails with that message.
 */
export function loadTasks(): Promise<void> {
  loaded ??= (async () => {
    const dir = fileURLToPath(new URL('./tasks/', import.meta.url));
    const files = readdirSync(dir)
      .filter((f) => /\.(ts|js)$/.test(f) && !f.endsWith('.d.ts'))
      .sort();
    for (const f of files) {
      try {
        await import(pathToFileURL(path.join(dir, f)).href);
      } catch (e) {
        loadErrors.set(f.replace(/\.(ts|js)$/, ''), (e as Error).message);
      }
    }
  })();
  return loaded;
}

/** The runner of `task`, or an Error: "no runner for task X" (or why its file failed to load). */
export async function getRunner(task: string): Promise<TaskRunner> {
  await loadTasks();
  const r = runners.get(task);
  if (r) return r;
  const err = loadErrors.get(task);
  if (err !== undefined) throw new Error(`runner for task ${task} failed to load: ${err}`);
  throw new Error(`no runner for task ${task}`);
}
