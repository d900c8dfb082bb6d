import type { Redis } from 'ioredis';
import { describe, expect, it } from 'vitest';
import { EventHub, type Subscription } from '../../models/event-hub.js';

// The event hub's reads against a scripted connection: each XREAD waits until the test answers it,
// so that a follower can join exactly while a read is on its way back.

type Entry = [string, string[]];
interface Read {
  keys: string[];
  ids: string[];
  answer(reply: [string, Entry[]][] | null): void;
}

function scriptedRedis() {
  const reads: Read[] = [];
  let waiting: ((r: Read) => void) | null = null;
  const conn = {
    on: () => conn,
    disconnect: () => undefined,
    client: async () => 7,
    xread: (...args: (string | number)[]) =>
      new Promise((resolve) => {
        const at = args.indexOf('STREAMS');
        const rest = args.slice(at + 1).map(String);
        const read: Read = {
          keys: rest.slice(0, rest.length / 2),
          ids: rest.slice(rest.length / 2),
          answer: resolve,
        };
        reads.push(read);
        waiting?.(read);
      }),
  };
  // CLIENT UNBLOCK that arrives too late to cut the read short: the read comes back with data
  const redis = { duplicate: () => conn, client: async () => 0 } as unknown as Redis;
  /** the next read the hub sends (or the one waiting to be answered) */
  const nextRead = (after: number) =>
    new Promise<Read>((resolve) => {
      if (reads.length > after) return resolve(reads[after]!);
      waiting = (r) => {
        waiting = null;
        resolve(r);
      };
    });
  return { redis, reads, nextRead };
}

const entry = (id: string, step: number): Entry => [
  id,
  ['event', 'progress', 'data', JSON.stringify({ step })],
];
const steps = (s: Subscription) => s.take().map((e) => e.data.step);

describe('EventHub', () => {
  it('a follower that joins from an earlier event as a read comes back gets every event after its place', async () => {
    const { redis, nextRead } = scriptedRedis();
    const hub = new EventHub(redis, { blockMs: 60_000 });
    try {
      // a follower already at event 2-0 (it has steps 1 and 2): the hub reads on from there
      const ahead = hub.subscribe('stream', '2-0');
      const first = await nextRead(0);
      expect(first).toMatchObject({ keys: ['stream'], ids: ['2-0'] });
      // a client that had only step 1 reconnects (Last-Event-ID 1-0) while that read is answered
      // with step 3: the read began after its place, so step 2 must not be skipped
      const resumed = hub.subscribe('stream', '1-0');
      first.answer([['stream', [entry('3-0', 3)]]]);
      const second = await nextRead(1);
      expect(second).toMatchObject({ keys: ['stream'], ids: ['1-0'] });
      expect(steps(ahead)).toEqual([3]);
      expect(resumed.pending).toBe(false);
      second.answer([['stream', [entry('2-0', 2), entry('3-0', 3)]]]);
      await nextRead(2);
      expect(steps(resumed)).toEqual([2, 3]);
      // the follower that had step 3 already is not given it again
      expect(ahead.pending).toBe(false);
    } finally {
      hub.close();
    }
  });
});
