import type { Redis } from 'ioredis';
import type { JobEvent } from './registry.js';

/** A Redis Stream id as [milliseconds, sequence]; '0' (the start) is [0, 0]. */
function parseId(id: string): [number, number] {
  const dash = id.indexOf('-');
  return dash < 0 ? [Number(id), 0] : [Number(id.slice(0, dash)), Number(id.slice(dash + 1))];
}

/** Whether stream id `a` comes after `b`. */
export function idAfter(a: string, b: string): boolean {
  const [am, as] = parseId(a);
  const [bm, bs] = parseId(b);
  return am > bm || (am === bm && as > bs);
}

/** Entries of an XREAD reply's stream as job events. */
export function parseEntries(entries: [string, string[]][]): JobEvent[] {
  const out: JobEvent[] = [];
  for (const [id, fields] of entries) {
    const f: Record<string, string> = {};
    for (let i = 0; i + 1 < fields.length; i += 2) f[fields[i]!] = fields[i + 1]!;
    out.push({
      id,
      event: f.event ?? 'message',
      data: JSON.parse(f.data ?? '{}') as Record<string, unknown>,
    });
  }
  return out;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * One follower's place in an EventHub: the events read for it and not yet taken, in order.
 */
export class Subscription {
  /** the id of the last event read for this follower (its place in the stream) */
  position: string;
  private queue: JobEvent[] = [];
  private wake: (() => void) | null = null;

  constructor(
    private readonly hub: EventHub,
    readonly key: string,
    from: string,
  ) {
    this.position = from;
  }

  /** Whether events wait to be taken. */
  get pending(): boolean {
    return this.queue.length > 0;
  }

  /** Takes the events read so far. */
  take(): JobEvent[] {
    const q = this.queue;
    this.queue = [];
    return q;
  }

  /**
   * Resolves when events are waiting, when the hub's reads fail (see EventHub.failingSince), when
   * `ms` pass, or when `signal` aborts.
   */
  wait(ms: number, signal: AbortSignal): Promise<void> {
    if (this.queue.length || signal.aborted) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener('abort', done);
        this.wake = null;
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener('abort', done);
      this.wake = done;
    });
  }

  /** Leaves the hub. */
  close(): void {
    this.hub.remove(this);
  }

  /** Queues the events after this follower's position (read by the hub, or by the follower itself). */
  deliver(events: JobEvent[]): void {
    for (const ev of events) {
      if (!idAfter(ev.id, this.position)) continue;
      this.queue.push(ev);
      this.position = ev.id;
    }
    if (this.queue.length) this.wake?.();
  }

  /** (the hub) wakes the follower without events: the hub's reads are failing */
  notify(): void {
    this.wake?.();
  }
}

/**
 * Every event follower of a process reads through one blocking XREAD over all the streams followed,
 * on one connection of its own, instead of one connection and one blocking read per follower: a
 * decoding step's tokens for many streams come back in one reply. A follower joins with the id it
 * follows from; when the read in flight does not cover it yet, that read is cut short (CLIENT
 * UNBLOCK) and the next one includes it, so it waits for no other stream's events. While Redis is
 * unreachable the reads fail fast and are retried every `retryMs`; followers are woken to see that
 * (failingSince) and keep their place.
 */
export class EventHub {
  private readonly conn: Redis;
  private readonly byKey = new Map<string, Set<Subscription>>();
  /** bumped whenever a follower joins: a read issued before that may not cover it */
  private version = 0;
  /** the version of the follower set the read in flight covers; -1 when none is in flight */
  private readingVersion = -1;
  private running = false;
  private interrupting = false;
  private connId: number | null = null;
  private closed = false;
  /** since when the hub's reads have been failing (ms since the epoch), 0 while they succeed */
  failingSince = 0;
  /** the last read's error while they fail */
  lastError: Error | null = null;

  constructor(
    /** the registry's connection: the blocking one is a duplicate of it, CLIENT UNBLOCK goes on it */
    private readonly redis: Redis,
    private readonly options: { blockMs?: number; retryMs?: number; connectionName?: string } = {},
  ) {
    this.conn = redis.duplicate({
      maxRetriesPerRequest: 1,
      connectionName: options.connectionName ?? 'xt-events',
    });
    this.conn.on('error', () => undefined); // reported through the failing reads
    this.conn.on('close', () => (this.connId = null));
  }

  /** Follows the stream at `key` from after `from` ('0': from its start). */
  subscribe(key: string, from: string): Subscription {
    if (this.closed) throw new Error('EventHub: closed');
    const sub = new Subscription(this, key, from);
    let set = this.byKey.get(key);
    if (!set) this.byKey.set(key, (set = new Set()));
    set.add(sub);
    this.version++;
    if (!this.running) void this.loop();
    else void this.interrupt();
    return sub;
  }

  /** (a subscription) leaves; its stream is dropped from the next read when it was the last one on it */
  remove(sub: Subscription): void {
    const set = this.byKey.get(sub.key);
    if (!set?.delete(sub)) return;
    if (!set.size) this.byKey.delete(sub.key);
  }

  /** Followers now, over how many streams. */
  get size(): { followers: number; streams: number } {
    let followers = 0;
    for (const s of this.byKey.values()) followers += s.size;
    return { followers, streams: this.byKey.size };
  }

  /** Stops reading and closes the connection; followers still there see no more events. */
  close(): void {
    this.closed = true;
    this.conn.disconnect();
  }

  private async loop(): Promise<void> {
    this.running = true;
    try {
      while (this.byKey.size && !this.closed) {
        const keys = [...this.byKey.keys()];
        // each stream from the earliest place among its followers
        const ids = keys.map((k) => {
          let from: string | null = null;
          for (const s of this.byKey.get(k)!)
            if (from === null || idAfter(from, s.position)) from = s.position;
          return from!;
        });
        const fromOf = new Map(keys.map((k, i) => [k, ids[i]!]));
        let reply: [string, [string, string[]][]][] | null;
        try {
          if (this.connId === null) this.connId = Number(await this.conn.client('ID'));
          this.readingVersion = this.version;
          reply = (await this.conn.xread(
            'COUNT',
            1000,
            'BLOCK',
            this.options.blockMs ?? 2000,
            'STREAMS',
            ...keys,
            ...ids,
          )) as [string, [string, string[]][]][] | null;
          this.failingSince = 0;
          this.lastError = null;
        } catch (e) {
          this.readingVersion = -1;
          if (this.closed) return;
          this.failingSince ||= Date.now();
          this.lastError = e instanceof Error ? e : new Error(String(e));
          for (const set of this.byKey.values()) for (const s of set) s.notify();
          await sleep(this.options.retryMs ?? 200);
          continue;
        }
        this.readingVersion = -1;
        for (const [key, entries] of reply ?? []) {
          const set = this.byKey.get(key);
          if (!set) continue;
          const events = parseEntries(entries);
          const from = fromOf.get(key) ?? '0';
          // only to followers this read covered: one placed before its start (it joined, from an
          // earlier event, as the read came back) would skip the events between; the next read
          // starts at its place
          for (const s of [...set]) if (!idAfter(from, s.position)) s.deliver(events);
        }
      }
    } finally {
      this.running = false;
      // a follower that joined as the last read ended
      if (this.byKey.size && !this.closed) void this.loop();
    }
  }

  /**
   * Cuts short the read in flight while it does not cover every follower: CLIENT UNBLOCK makes it
   * return at once (with nothing), and the loop reads again with the new followers.
   */
  private async interrupt(): Promise<void> {
    if (this.interrupting) return;
    this.interrupting = true;
    try {
      while (!this.closed && this.readingVersion >= 0 && this.readingVersion < this.version) {
        const id = this.connId;
        if (id === null) break; // not connected: the next read covers everyone
        // (after an UNBLOCK that took, the loop reads again at once and this loop ends; one that
        // found the read not yet blocked at Redis is tried again)
        await this.redis.client('UNBLOCK', id);
        await sleep(1);
      }
    } catch {
      // Redis away: the failing read is retried with every follower
    } finally {
      this.interrupting = false;
    }
  }
}
