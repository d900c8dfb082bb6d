import * as tf from '@tensorflow/tfjs-core';
import { readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { readCase } from './case.js';
import type { Comparison } from './compare.js';
import { getRunner } from './registry.js';

/** The outcome of one case file. */
export interface CaseResult {
  file: string;
  name: string;
  task: string;
  ok: boolean;
  /** worst absolute error over every comparison (NaN when nothing was compared) */
  maxAbsErr: number;
  /** why it failed: the first failing comparison, or the error thrown */
  message?: string;
  comparisons: Comparison[];
  /** tensors left allocated by the run (a leak), 0 when clean */
  leaked: number;
  ms: number;
}

/** Every `*.safetensors` file in `dir`, sorted by name (an Error when `dir` is not a folder). */
export function listCases(dir: string): string[] {
  if (!statSync(dir, { throwIfNoEntry: false })?.isDirectory()) {
    throw new Error(`parity: ${dir} is not a directory`);
  }
  return readdirSync(dir)
    .filter((f) => f.endsWith('.safetensors'))
    .sort()
    .map((f) => path.join(dir, f));
}

/**
 * Runs one case: reads it, runs its task's runner, and checks that every `output.*` entry was
 * compared. A throw anywhere is a failure carrying its message.
 */
export async function runCase(file: string): Promise<CaseResult> {
  const start = Date.now();
  const base = path.basename(file, '.safetensors');
  const before = tf.memory().numTensors;
  let name = base;
  let task = '?';
  const fail = (message: string, comparisons: Comparison[] = []): CaseResult => ({
    file,
    name,
    task,
    ok: false,
    maxAbsErr: worst(comparisons),
    message,
    comparisons,
    leaked: 0,
    ms: Date.now() - start,
  });
  let c;
  try {
    c = readCase(file);
  } catch (e) {
    return fail((e as Error).message);
  }
  name = c.name;
  task = c.task;
  let comparisons: Comparison[];
  try {
    const runner = await getRunner(c.task);
    comparisons = await runner(c);
  } catch (e) {
    c.dispose();
    const err = e as Error;
    return fail(err.message ?? String(e));
  }
  c.dispose();
  const leaked = tf.memory().numTensors - before;
  const compared = new Set(comparisons.map((r) => r.name.split(' ')[0]));
  const unchecked = Object.keys(c.outputs).filter((k) => !compared.has(`output.${k}`));
  const failed = comparisons.find((r) => !r.ok);
  const result: CaseResult = {
    file,
    name,
    task,
    ok: !failed && unchecked.length === 0 && comparisons.length > 0,
    maxAbsErr: worst(comparisons),
    comparisons,
    leaked,
    ms: Date.now() - start,
  };
  if (failed) result.message = failed.message ?? `${failed.name} differs`;
  else if (unchecked.length)
    result.message = `outputs not compared: ${unchecked.map((k) => `output.${k}`).join(', ')}`;
  else if (!comparisons.length) result.message = 'the task compared nothing';
  return result;
}

function worst(comparisons: Comparison[]): number {
  return comparisons.length ? Math.max(...comparisons.map((r) => r.maxAbsErr)) : NaN;
}

/** One report line: name, task, worst absolute error, PASS or FAIL with the reason. */
export function formatResult(r: CaseResult): string {
  const err = Number.isNaN(r.maxAbsErr) ? '-' : r.maxAbsErr.toExponential(2);
  const verdict = r.ok ? 'PASS' : `FAIL ${r.message ?? ''}`;
  const leak = r.leaked > 0 ? ` (leaked ${r.leaked} tensors)` : '';
  return `${r.name.padEnd(40)} ${r.task.padEnd(14)} ${err.padStart(9)}  ${verdict}${leak}`;
}
