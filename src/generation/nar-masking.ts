/**
 * The masking arithmetic of `NonAutoregressiveWrapper` (MaskGIT), on JavaScript arrays: the masking
 * schedules, the number of masked tokens per decoding step, and random subsets of a mask. The
 * reference computes these in float32 tensors; the numbers here are rounded to float32 at each step
 * (Math.fround) so that counts compared with them agree with it at the same inputs.
 */

/** A masking schedule: the fraction of tokens masked at time t in [0, 1] (1 at t = 0, 0 at t = 1). */
export type ScheduleFn = (t: number) => number;

/** The schedules by name: linear 1 - t, and MaskGIT's cosine cos(t pi / 2). */
export const NAR_SCHEDULES = {
  linear: (t: number): number => Math.fround(1 - t),
  cosine: (t: number): number =>
    Math.fround(Math.cos(Math.fround(Math.fround(t * Math.fround(Math.PI)) / 2))),
} satisfies Record<string, ScheduleFn>;

export type ScheduleName = keyof typeof NAR_SCHEDULES;

/** `count` float32 points evenly spaced from 0 to 1, as torch.linspace computes them (from both ends). */
export function linspace01(count: number): number[] {
  if (count === 1) return [0];
  const step = Math.fround(1 / (count - 1));
  const half = Math.floor(count / 2);
  return Array.from({ length: count }, (_, i) =>
    i < half ? Math.fround(step * i) : Math.fround(1 - Math.fround(step * (count - 1 - i))),
  );
}

/**
 * How many of `seqLen` tokens stay masked after each of `steps` decoding steps:
 * floor(schedule(t) * seqLen) at t = 1/steps, 2/steps, ..., 1.
 */
export function maskCounts(schedule: ScheduleFn, steps: number, seqLen: number): number[] {
  return linspace01(steps + 1)
    .slice(1)
    .map((t) => Math.max(0, Math.trunc(Math.fround(schedule(t) * seqLen))));
}

/** Ranks of `values` in ascending order (0 = smallest; ties by position). */
function ranks(values: ArrayLike<number>, offset: number, n: number): number[] {
  const idx = Array.from({ length: n }, (_, j) => j);
  idx.sort((a, b) => values[offset + a]! - values[offset + b]! || a - b);
  const out = new Array<number>(n);
  idx.forEach((j, r) => (out[j] = r));
  return out;
}

/**
 * The training mask of each row: with t = times[r], the positions whose rank in `permNoise` (the
 * reference's argsort of uniform noise) is below max(schedule(t) * n, 1).
 * times: [b], permNoise: [b * n] (row-major) -> [b * n] 0/1.
 */
export function scheduleMask(
  schedule: ScheduleFn,
  times: ArrayLike<number>,
  permNoise: ArrayLike<number>,
  b: number,
  n: number,
): Uint8Array {
  const out = new Uint8Array(b * n);
  for (let r = 0; r < b; r++) {
    const k = Math.max(Math.fround(schedule(times[r]!) * n), 1);
    // argsort of the noise: position j holds the index of the j-th smallest value
    const order = Array.from({ length: n }, (_, j) => j).sort(
      (a, c) => permNoise[r * n + a]! - permNoise[r * n + c]! || a - c,
    );
    for (let j = 0; j < n; j++) if (order[j]! < k) out[r * n + j] = 1;
  }
  return out;
}

/**
 * A random subset of each row of `mask`: the fraction `prob` of its set positions (rounded up as the
 * reference's comparison of ranks with count * prob does), chosen by the order of `noise`.
 * mask, noise: [b * n] -> [b * n] 0/1, a subset of mask.
 */
export function maskSubset(
  mask: Uint8Array,
  prob: number,
  noise: ArrayLike<number>,
  b: number,
  n: number,
): Uint8Array {
  const out = new Uint8Array(b * n);
  const p = Math.fround(prob);
  for (let r = 0; r < b; r++) {
    let count = 0;
    const vals = new Float64Array(n);
    for (let j = 0; j < n; j++) {
      const on = mask[r * n + j] === 1;
      if (on) count++;
      vals[j] = on ? noise[r * n + j]! : -1;
    }
    const limit = Math.max(Math.fround(count * p), 0);
    const padding = n - count;
    const rk = ranks(vals, 0, n);
    for (let j = 0; j < n; j++) if (mask[r * n + j] === 1 && rk[j]! - padding < limit) out[r * n + j] = 1;
  }
  return out;
}
