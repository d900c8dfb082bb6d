import type { NewJobEvent, Registry } from '../models/registry.js';

/**
 * Job events written in batches: the events appended in one turn of the event loop (the tokens of
 * one decoding step, for every generation in it) go to Redis in one round trip, in the order they
 * were appended. Each append resolves with its entry id once written.
 */
export class EventWriter {
  private pending: { event: NewJobEvent; resolve: (id: string) => void; reject: (e: unknown) => void }[] = [];

  constructor(private readonly registry: Registry) {}

  /** Appends `event` to job `jobId`'s stream with the others of this turn. */
  append(jobId: string, event: string, data: Record<string, unknown>): Promise<string> {
    return new Promise<string>((resolve, reject) => {
      if (!this.pending.length) queueMicrotask(() => this.flush());
      this.pending.push({ event: { jobId, event, data }, resolve, reject });
    });
  }

  private flush(): void {
    const batch = this.pending;
    this.pending = [];
    this.registry.appendEvents(batch.map((p) => p.event)).then(
      (ids) => batch.forEach((p, i) => p.resolve(ids[i]!)),
      (e: unknown) => batch.forEach((p) => p.reject(e)),
    );
  }
}
