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
 *
 * With `turns` above 1, a write waits for the events of that many turns (a decode loop runs one
 * step a turn: the tokens of that many steps go out together), so that a busy loop pays for one
 * write, and the processes that read the stream for one wake, every few steps rather than every
 * step. An urgent event (a generation's first token, a job's end) sends the write at the end of its
 * turn, with everything before it.
 */
export class EventWriter {
  private pending: NewJobEvent[] = [];
  private current: Promise<AppendedEvent[]> | null = null;
  private currentIds: Promise<string[]> | null = null;
  /** opens the current write's gate (it then starts); whether it waits for later turns */
  private gate: { open: () => void; deferred: boolean } | null = null;

  constructor(
    private readonly registry: Registry,
    /** the turns of the event loop whose events go out in one write (1: each turn's own) */
    readonly turns = 1,
  ) {
    if (!(Number.isInteger(turns) && turns >= 1))
      throw new Error(`EventWriter: turns: expected an integer >= 1, got ${turns}`);
  }

  /**
   * Appends `event` to job `jobId`'s stream with the others of this turn (and of the next ones, up
   * to `turns`); `urgent` sends it at the end of this turn.
   */
  append(jobId: string, event: string, data: Record<string, unknown>, urgent = false): PendingEvent {
    return this.add({ jobId, event, data }, urgent);
  }

  /**
   * Ends job `jobId` with the others of this turn (see `Registry.endJob`), at once; with
   * `ifCancelled`, a job whose cancel was requested ends as cancelled instead, with that as its
   * event's data and progress. Resolves with whether this ended the job and the job's state after it.
   */
  async end(
    jobId: string,
    type: 'train' | 'generate',
    end: JobEnd,
    ifCancelled?: Record<string, unknown>,
  ): Promise<{ applied: boolean; state: JobState | null }> {
    const { at } = this.add(endEvent(jobId, type, end, ifCancelled), true);
    const r = (await this.current!)[at]!;
    return { applied: r.id !== '', state: r.state };
  }

  private add(e: NewJobEvent, urgent: boolean): PendingEvent {
    if (!this.current) {
      const batch = this.pending;
      let open!: () => void;
      const opened = new Promise<void>((resolve) => (open = resolve));
      const gate = { open, deferred: false };
      const write = opened.then(() => {
        this.current = null;
        this.currentIds = null;
        this.gate = null;
        this.pending = [];
        return this.registry.writeEvents(batch);
      });
      this.gate = gate;
      this.current = write;
      this.currentIds = write.then((r) => r.map((x) => x.id));
      // a failed write reaches whoever waits on it; nobody waiting is no crash
      this.current.catch(() => undefined);
      this.currentIds.catch(() => undefined);
      if (urgent || this.turns === 1) {
        // at the end of this turn
        queueMicrotask(open);
      } else {
        // at the check phase `turns - 1` turns after the next one, before what the loop queued
        // after it there (its next step): the events of the turns between (the next steps'
        // tokens) join this write
        gate.deferred = true;
        let left = this.turns;
        const tick = () => (--left > 0 ? setImmediate(tick) : open());
        setImmediate(tick);
      }
    } else if (urgent && this.gate?.deferred) {
      this.gate.deferred = false;
      queueMicrotask(this.gate.open);
    }
    this.pending.push(e);
    return { written: this.currentIds!, at: this.pending.length - 1 };
  }
}
