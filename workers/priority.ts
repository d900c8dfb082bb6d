/**
 * Generation before training in one worker process: a training job waits before each step while a
 * generation runs (and for `graceMs` after the last one ends, so the next queued generation is
 * picked up before training takes the CPU again), but never longer than `maxPauseMs` in a row, so
 * training still advances under a steady stream of generations.
 */
export class GenerationPriority {
  private active = 0;
  private lastEnd = 0;
  private waiters = new Set<() => void>();

  constructor(
    readonly maxPauseMs = 2000,
    readonly graceMs = 50,
  ) {
    if (!(maxPauseMs >= 0)) throw new Error(`maxPauseMs: expected a number >= 0, got ${maxPauseMs}`);
    if (!(graceMs >= 0)) throw new Error(`graceMs: expected a number >= 0, got ${graceMs}`);
  }

  /** Generations running now. */
  get running(): number {
    return this.active;
  }

  /** Marks a generation as running; call the returned function (once) when it ends. */
  begin(): () => void {
    this.active++;
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      this.active--;
      this.lastEnd = Date.now();
      if (this.active === 0) this.wake();
    };
  }

  /**
   * Resolves when training may take its next step: at once when no generation runs or ended within
   * `graceMs`, else when they are done (plus the grace), when `maxPauseMs` has passed, or when
   * `signal` aborts. Returns the milliseconds waited.
   */
  async beforeTrainStep(signal?: AbortSignal): Promise<number> {
    const t0 = Date.now();
    const deadline = t0 + this.maxPauseMs;
    for (;;) {
      const now = Date.now();
      if (signal?.aborted || now >= deadline) break;
      const graceLeft = this.lastEnd + this.graceMs - now;
      if (this.active === 0 && graceLeft <= 0) break;
      const waitMs = Math.min(deadline - now, this.active === 0 ? graceLeft : deadline - now);
      await this.wait(waitMs, signal);
    }
    return Date.now() - t0;
  }

  private wait(ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.waiters.delete(done);
        signal?.removeEventListener('abort', done);
        resolve();
      };
      const t = setTimeout(done, ms);
      this.waiters.add(done);
      signal?.addEventListener('abort', done);
    });
  }

  private wake(): void {
    for (const w of [...this.waiters]) w();
  }
}
