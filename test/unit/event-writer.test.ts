import { describe, expect, it } from 'vitest';
import type { NewJobEvent, Registry } from '../../models/registry.js';
import { EventWriter } from '../../workers/event-writer.js';

// A worker's writes of job events: one write per turn of the event loop, or per `turns` turns (a
// decode loop runs one step a turn), with urgent events sent at the end of their own turn.

/** A registry whose writes are recorded (event names) and answered at once. */
function recording(): { registry: Registry; calls: string[][] } {
  const calls: string[][] = [];
  const registry = {
    writeEvents: (events: NewJobEvent[]) => {
      calls.push(events.map((e) => `${e.jobId}:${e.event}`));
      return Promise.resolve(events.map((_, i) => ({ id: `${calls.length}-${i}`, state: null })));
    },
  } as unknown as Registry;
  return { registry, calls };
}

/** Resolves at the check phase of the next turn of the event loop. */
const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

describe('EventWriter', () => {
  it("writes a turn's events together, at the end of that turn", async () => {
    const { registry, calls } = recording();
    const w = new EventWriter(registry);
    let turned = false;
    setImmediate(() => (turned = true));
    const a = w.append('j1', 'token', { index: 0 });
    const b = w.append('j2', 'token', { index: 0 });
    expect(b.written).toBe(a.written);
    expect(await a.written).toEqual(['1-0', '1-1']);
    expect([a.at, b.at]).toEqual([0, 1]);
    // written before the event loop went on
    expect(turned).toBe(false);
    expect(calls).toEqual([['j1:token', 'j2:token']]);
  });

  it("with turns = 2, the next turn's events join the write, which goes out before the turn after", async () => {
    const { registry, calls } = recording();
    const w = new EventWriter(registry, 2);
    const a = w.append('j1', 'token', { index: 1 });
    // the loop's next step, queued after the write's own wait (as the decode loop queues it)
    await nextTurn();
    expect(calls).toEqual([]);
    const b = w.append('j1', 'token', { index: 2 });
    expect(b.written).toBe(a.written);
    // what the loop queues now comes after the write
    let queuedAfter = false;
    setImmediate(() => (queuedAfter = calls.length > 0));
    expect(await a.written).toEqual(['1-0', '1-1']);
    await nextTurn();
    expect(queuedAfter).toBe(true);
    expect(calls).toEqual([['j1:token', 'j1:token']]);
    // and the turn after starts a write of its own
    const c = w.append('j1', 'token', { index: 3 });
    expect(c.written).not.toBe(a.written);
    await c.written;
    expect(calls).toEqual([['j1:token', 'j1:token'], ['j1:token']]);
  });

  it("an urgent event (a first token, a job's end) sends the waiting write at the end of its turn", async () => {
    const { registry, calls } = recording();
    const w = new EventWriter(registry, 4);
    const a = w.append('j1', 'token', { index: 5 });
    let turned = false;
    setImmediate(() => (turned = true));
    const first = w.append('j2', 'token', { index: 0 }, true);
    expect(first.written).toBe(a.written);
    await first.written;
    expect(turned).toBe(false);
    expect(calls).toEqual([['j1:token', 'j2:token']]);
    // a job's end is urgent: it does not wait for the turns either
    w.append('j1', 'token', { index: 6 });
    turned = false;
    setImmediate(() => (turned = true));
    await w.end('j1', 'generate', { state: 'completed', result: {} });
    expect(turned).toBe(false);
    expect(calls).toEqual([
      ['j1:token', 'j2:token'],
      ['j1:token', 'j1:done'],
    ]);
  });

  it('rejects a number of turns that is not a positive integer, naming it', () => {
    const { registry } = recording();
    expect(() => new EventWriter(registry, 0)).toThrow('EventWriter: turns: expected an integer >= 1, got 0');
    expect(() => new EventWriter(registry, 1.5)).toThrow(/turns: expected an integer >= 1, got 1\.5/);
  });
});
