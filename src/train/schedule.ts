/**
 * Learning-rate schedules: linear warmup, then cosine decay to a floor or a constant rate.
 */

export type ScheduleName = 'cosine' | 'constant';

export interface ScheduleOptions {
  learningRate: number;
  totalSteps: number;
  warmupSteps?: number;
  schedule?: ScheduleName;
  minLearningRate?: number;
}

/**
 * The rate for 0-based `step`: during warmup `learningRate * (step + 1) / warmupSteps`; then either
 * constant or a half cosine from `learningRate` down to `minLearningRate` at `totalSteps - 1`.
 */
export function learningRateAt(step: number, o: ScheduleOptions): number {
  const warmup = o.warmupSteps ?? 0;
  const lr = o.learningRate;
  if (step < warmup) return (lr * (step + 1)) / warmup;
  if ((o.schedule ?? 'cosine') === 'constant') return lr;
  const minLr = o.minLearningRate ?? 0;
  const span = Math.max(1, o.totalSteps - warmup - 1);
  const progress = Math.min(1, (step - warmup) / span);
  return minLr + 0.5 * (lr - minLr) * (1 + Math.cos(Math.PI * progress));
}

/** Checks schedule options, throwing an Error naming the bad one. */
export function checkScheduleOptions(o: ScheduleOptions): void {
  if (!(o.learningRate >= 0))
    throw new Error(`learningRate: expected a non-negative number, got ${o.learningRate}`);
  if (!Number.isInteger(o.totalSteps) || o.totalSteps < 1) {
    throw new Error(`totalSteps: expected a positive integer, got ${o.totalSteps}`);
  }
  const w = o.warmupSteps ?? 0;
  if (!Number.isInteger(w) || w < 0)
    throw new Error(`warmupSteps: expected a non-negative integer, got ${w}`);
  const s = o.schedule ?? 'cosine';
  if (s !== 'cosine' && s !== 'constant') {
    throw new Error(`schedule: expected 'cosine' or 'constant', got ${JSON.stringify(s)}`);
  }
  const m = o.minLearningRate ?? 0;
  if (!(m >= 0 && m <= o.learningRate)) {
    throw new Error(`minLearningRate: expected a number in [0, learningRate], got ${m}`);
  }
}
