import {
  endEvent,
  type AppendedEvent,
  type JobEnd,
  type NewJobEvent,
  type Registry,
} from '../models/registry.js';
import type { JobState } from '../models/schemas.js';

/** An event handed to an `EventWriter`: the write it goes out with, and its place in that write. */
export interface PendingEvent {
  /** resolves with the entry ids of the whole write, in append order */
  written: Promise<string[]>;
  /** this event's index in that write */
  at: number;
}

/**
 * Job events written in batches: the events appended in one turn of the event loop (the tokens of
 * one decoding step, for every generation in it, and the ends of those that finished) go to Redis in
 * one round trip, in the order they were appended. Writes leave one connection in order, so a write
 * that resolved means every earlier one did.
 */
export class EventWriter {
  private pending: NewJobEvent[] = [];
  private current: Promise<AppendedEvent[]> | null = null;
  private currentIds: Promise<string[]> | null = null;

  constructor(private readonly registry: Registry) {}

  /** Appends `event` to job `jobId`'s stream with the others of this turn. */
  append(jobId: string, event: string, data: Record<string, unknown>): PendingEvent {
    return this.add({ jobId, event, data });
  }

  /**
   * Ends job `jobId` with the others of this turn (see `Registry.endJob`); with `ifCancelled`, a job
   * whose cancel was requested ends as cancelled instead, with that as its event's data and progress.
   * Resolves with whether this ended the job and the job's state after it.
   */
  async end(
    jobId: string,
    type: 'train' | 'generate',
    end: JobEnd,
    ifCancelled?: Record<string, unknown>,
  ): Promise<{ applied: boolean; state: JobState | null }> {
    const { at } = this.add(endEvent(jobId, type, end, ifCancelled));
    const r = (await this.current!)[at]!;
    return { applied: r.id !== '', state: r.state };
  }

  private add(e: NewJobEvent): PendingEvent {
    if (!this.current) {
      const batch = this.pending;
      const write = new Promise<void>((resolve) => queueMicrotask(resolve)).then(() => {
        this.current = null;
        this.currentIds = null;
        this.pending = [];
        return this.registry.writeEvents(batch);
      });
      this.current = write;
      this.currentIds = write.then((r) => r.map((x) => x.id));
      // a failed write reaches whoever waits on it; nobody waiting is no crash
      this.current.catch(() => undefined);
      this.currentIds.catch(() => undefined);
    }
    this.pending.push(e);
    return { written: this.currentIds!, at: this.pending.length - 1 };
  }
}
