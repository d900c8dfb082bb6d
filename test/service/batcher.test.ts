import { describe, expect, it } from 'vitest';
import { AutoregressiveWrapper, Decoder, manualSeed, TransformerWrapper } from '../../src/index.js';
import { batcherFor, GenerationBatcher } from '../../workers/batcher.js';
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

  it('a model the batched path cannot decode gets no batcher', () => {
    const m = loaded('m@3', { residualAttn: true });
    expect(GenerationBatcher.unsupported(m)).toMatch(/residualAttn/);
    expect(batcherFor(new Map(), m, 2)).toBeNull();
    m.built.model.dispose();
  });
});
