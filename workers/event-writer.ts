import type { NewJobEvent, Registry } from '../models/registry.js';

/** An event handed to an `EventWriter`: the write it goes out with, and its place in that write. */
export interface PendingEvent {
  /** resolves with the entry ids of the whole write, in append order */
  written: Promise<string[]>;
  /** this event's index in that write */
  at: number;
}

/**
 * Job events written in batches: the events appended in one turn of the event loop (the tokens of
 * one decoding step, for every generation in it) go to Redis in one round trip, in the order they
 * were appended. Writes leave one connection in order, so a write that resolved means every earlier
 * one did.
 */
export class EventWriter {
  private pending: NewJobEvent[] = [];
  private current: Promise<string[]> | null = null;

  constructor(private readonly registry: Registry) {}

  /** Appends `event` to job `jobId`'s stream with the others of this turn. */
  append(jobId: string, event: string, data: Record<string, unknown>): PendingEvent {
    if (!this.current) {
      const batch = this.pending;
      this.current = new Promise<void>((resolve) => queueMicrotask(resolve)).then(() => {
        this.current = null;
        this.pending = [];
        return this.registry.appendEvents(batch);
      });
      // a failed write reaches whoever waits on it; nobody waiting is no crash
      this.current.catch(() => undefined);
    }
    this.pending.push({ jobId, event, data });
    return { written: this.current, at: this.pending.length - 1 };
  }
}
