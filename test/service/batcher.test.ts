import { describe, expect, it } from 'vitest';
import { AutoregressiveWrapper, Decoder, manualSeed, TransformerWrapper } from '../../src/index.js';
import { batcherFor, GenerationBatcher } from '../../workers/batcher.js';
import { createMetrics, recordDecodeStep, type DecodeStep } from '../../workers/metrics.js';
import type { LoadedModel } from '../../workers/model-cache.js';
import { waitFor } from './helpers.js';

function loaded(key: string, layers: Record<string, unknown> = { rotaryPosEmb: true }): LoadedModel {
  manualSeed(1);
  const model = new TransformerWrapper({
    numTokens: 32,
    maxSeqLen: 32,
    attnLayers: new Decoder({ dim: 16, depth: 1, heads: 2, ...layers }),
  });
  model.eval();
  return {
    key,
    built: { model, numTokens: 32, maxSeqLen: 32 },
    ar: new AutoregressiveWrapper(model),
    tokenizer: undefined as unknown as LoadedModel['tokenizer'],
  };
}

describe('GenerationBatcher', () => {
  it('runs generations to their ends: length, a stop from the handler, an abort; then leaves the map', async () => {
    const m = loaded('m@1');
    const batchers = new Map<string, GenerationBatcher>();
    const b = batcherFor(batchers, m, 4)!;
    expect(batcherFor(batchers, m, 4)).toBe(b);
    const seen: number[][] = [[], [], []];
    const ac = new AbortController();
    const ends = await Promise.all([
      b.run({
        prompt: [1, 2],
        options: { maxTokens: 6, temperature: 0 },
        onToken: (t) => (seen[0]!.push(t.token), false),
      }),
      b.run({
        prompt: [3],
        options: { maxTokens: 20, temperature: 0 },
        onToken: (t) => (seen[1]!.push(t.token), t.index === 2),
      }),
      b.run({
        prompt: [4, 5, 6],
        options: { maxTokens: 20, temperature: 0 },
        signal: ac.signal,
        onToken: (t) => {
          seen[2]!.push(t.token);
          if (t.index === 3) ac.abort();
          return false;
        },
      }),
    ]);
    expect(ends).toEqual(['length', 'stopped', 'aborted']);
    expect(seen.map((s) => s.length)).toEqual([6, 3, 4]);
    // the loop ends with its last generation, and the batcher leaves the map
    await waitFor(async () => batchers.size === 0, 5000, 'the batcher to leave the map');
    m.built.model.dispose();
  });

  it('generations started in one turn on an idle batcher join its first step together', async () => {
    const m = loaded('m@3');
    const b = new GenerationBatcher(m, 4);
    const order: string[] = [];
    const run = (name: string, prompt: number[]) =>
      b.run({
        prompt,
        options: { maxTokens: 3, temperature: 0 },
        onToken: (t) => (order.push(`${name}${t.index}`), false),
      });
    const ends = await Promise.all([run('a', [1, 2]), run('b', [3])]);
    expect(ends).toEqual(['length', 'length']);
    // both prompts are prefilled in the first step, then both advance in each later one
    expect(order).toEqual(['a0', 'b0', 'a1', 'b1', 'a2', 'b2']);
    b.dispose();
    m.built.model.dispose();
  });

  it('reports each step: its rows, the prompts it prefilled, its time and the wait before it; /metrics counts them', async () => {
    const m = loaded('m@4');
    const steps: DecodeStep[] = [];
    const metrics = createMetrics();
    const b = new GenerationBatcher(m, 4, undefined, (s) => {
      steps.push(s);
      recordDecodeStep(metrics.decode, s);
    });
    const run = (prompt: number[], maxTokens: number) =>
      b.run({ prompt, options: { maxTokens, temperature: 0 }, onToken: () => false });
    await Promise.all([run([1, 2], 3), run([3], 2)]);
    // both prefilled in the first step; the second leaves after its second token
    expect(steps.map((s) => [s.rows, s.prefills])).toEqual([
      [2, 2],
      [2, 0],
      [1, 0],
    ]);
    expect(steps.every((s) => s.seconds > 0)).toBe(true);
    // the loop's first step has no wait before it; the others do
    expect(steps[0]!.betweenSeconds).toBeNull();
    expect(steps.slice(1).every((s) => s.betweenSeconds !== null && s.betweenSeconds >= 0)).toBe(true);
    // a generation that comes while the loop waits after its last step (the others' ends are
    // handed out before it yields) joins the same run: its step has a wait before it
    await run([4], 1);
    expect(steps.length).toBe(4);
    expect(steps[3]).toMatchObject({ rows: 1, prefills: 1 });
    expect(steps[3]!.betweenSeconds).toBeGreaterThanOrEqual(0);
    const text = await metrics.registry.metrics();
    expect(text).toMatch(/^xt_decode_steps_total 4$/m);
    expect(text).toMatch(/^xt_decode_rows_total 6$/m);
    expect(text).toMatch(/^xt_decode_prefills_total 3$/m);
    expect(text).toMatch(/^xt_decode_step_seconds_count 4$/m);
    expect(text).toMatch(/^xt_decode_between_steps_seconds_count 3$/m);
    b.dispose();
    m.built.model.dispose();
  });

  it('a generation that joins a running batch gets its first token a turn before the next step, and runs in it', async () => {
    const m = loaded('m@5');
    const steps: DecodeStep[] = [];
    const b = new GenerationBatcher(m, 4, undefined, (s) => steps.push(s));
    const order: string[] = [];
    let joined: Promise<unknown> | null = null;
    const first = b.run({
      prompt: [1, 2],
      options: { maxTokens: 5, temperature: 0 },
      onToken: (t) => {
        order.push(`a${t.index}`);
        if (t.index === 1)
          joined = b.run({
            prompt: [3],
            options: { maxTokens: 3, temperature: 0 },
            onToken: (u) => {
              order.push(`b${u.index}`);
              // runs at the next turn of the event loop: before the batch's next step, or after it
              if (u.index === 0) setImmediate(() => order.push('turn'));
              return false;
            },
          });
        return false;
      },
    });
    await first;
    await joined;
    expect(order).toEqual(['a0', 'a1', 'b0', 'turn', 'a2', 'b1', 'a3', 'b2', 'a4']);
    // the step it joined reports its first token and the step's two
    expect(steps.map((s) => [s.rows, s.prefills])).toEqual([
      [1, 1],
      [1, 0],
      [3, 1],
      [2, 0],
      [1, 0],
    ]);
    b.dispose();
    m.built.model.dispose();
  });

  it('an already aborted request leaves no batcher behind; an idle batcher of an earlier load is replaced', async () => {
    const batchers = new Map<string, GenerationBatcher>();
    const first = loaded('m@2');
    const ac = new AbortController();
    ac.abort();
    const b = batcherFor(batchers, first, 2)!;
    expect(
      await b.run({ prompt: [1], options: { maxTokens: 3 }, onToken: () => false, signal: ac.signal }),
    ).toBe('aborted');
    expect(batchers.size).toBe(0);

    batchers.set('m@2', new GenerationBatcher(first, 2));
    const again = loaded('m@2');
    const b2 = batcherFor(batchers, again, 2)!;
    expect(b2.model).toBe(again);
    expect(batchers.get('m@2')).toBe(b2);
    b2.dispose();
    first.built.model.dispose();
    again.built.model.dispose();
  });

  it('a full batch keeps new generations waiting for a place, in order; an abort while waiting ends one', async () => {
    const m = loaded('m@4');
    const batchers = new Map<string, GenerationBatcher>();
    const b = batcherFor(batchers, m, 2)!;
    const order: number[] = [];
    const ran = [0, 0, 0, 0];
    const ac = new AbortController();
    const gen = (i: number, maxTokens: number, signal?: AbortSignal) =>
      b
        .run({
          prompt: [i + 1],
          options: { maxTokens, temperature: 0 },
          signal,
          onToken: (t) => {
            if (t.index === 0) order.push(i);
            ran[i]!++;
            return false;
          },
        })
        .then((end) => [i, end] as const);
    const runs = [gen(0, 3), gen(1, 6), gen(2, 4, ac.signal), gen(3, 2)];
    // two in the batch, two waiting
    expect(b.size).toBe(4);
    ac.abort();
    const ends = await Promise.all(runs);
    expect(ends).toEqual([
      [0, 'length'],
      [1, 'length'],
      [2, 'aborted'],
      [3, 'length'],
    ]);
    // the aborted one never ran; the last one took the first free place
    expect(ran).toEqual([3, 6, 0, 2]);
    expect(order).toEqual([0, 1, 3]);
    await waitFor(async () => batchers.size === 0, 5000, 'the batcher to leave the map');
    m.built.model.dispose();
  });

  it('a model the batched path cannot decode gets no batcher', () => {
    const m = loaded('m@3', { residualAttn: true });
    expect(GenerationBatcher.unsupported(m)).toMatch(/residualAttn/);
    expect(batcherFor(new Map(), m, 2)).toBeNull();
    m.built.model.dispose();
  });
});
