import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { MultiInputTransformerWrapper } from '../../src/wrappers/multi-input.js';
import { Decoder, Encoder } from '../../src/layers/attention-layers.js';
import { fromConfig, toConfig } from '../../src/io/config.js';

const layers = (): Decoder => new Decoder({ dim: 8, depth: 1, heads: 2, attnDimHead: 4 });
const make = (extra = {}): MultiInputTransformerWrapper =>
  new MultiInputTransformerWrapper({
    numTokens: { note: 10, vel: 4 },
    maxSeqLen: 6,
    attnLayers: layers(),
    ...extra,
  });

describe('MultiInputTransformerWrapper', () => {
  it('names its embeddings and heads by input, as the reference', () => {
    const m = make({ embDim: 6, numMemoryTokens: 2 });
    const s = Object.fromEntries(m.namedParameters().map(([n, v]) => [n, v.shape]));
    expect(s['embeds.note_embed.weight']).toEqual([10, 6]);
    expect(s['embeds.vel_embed.weight']).toEqual([4, 6]);
    expect(s['pos_emb.emb.weight']).toEqual([6, 6]);
    expect(s['project_emb.weight']).toEqual([8, 6]);
    expect(s['to_logits.note.weight']).toEqual([10, 8]);
    expect(s['to_logits.vel.weight']).toEqual([4, 8]);
    expect(s['memory_tokens']).toEqual([2, 8]);
    m.dispose();
  });

  it('returns logits per input and leaks nothing', () => {
    const m = make().eval();
    const before = tf.memory().numTensors;
    const x = {
      note: tf.tensor2d([[1, 9, 3]], [1, 3], 'int32'),
      vel: tf.tensor2d([[0, 3, 2]], [1, 3], 'int32'),
    };
    const out = m.forward(x);
    expect(out.note!.shape).toEqual([1, 3, 10]);
    expect(out.vel!.shape).toEqual([1, 3, 4]);
    const e = m.forwardEmbeddings(x);
    expect(e.shape).toEqual([1, 3, 8]);
    tf.dispose([...Object.values(x), ...Object.values(out), e]);
    expect(tf.memory().numTensors).toBe(before);
    m.dispose();
  });

  it('rejects bad options and inputs, naming them', () => {
    expect(() => make({ numTokens: {} })).toThrow(
      /^numTokens: expected an object of positive integers by input name/,
    );
    expect(() => make({ numTokens: { note: 0 } })).toThrow(
      'numTokens.note: expected a positive integer, got 0',
    );
    expect(() => make({ numMemoryTokens: 1, memoryTokensInterspersedEvery: 0 })).toThrow(
      'memoryTokensInterspersedEvery: expected a positive integer, got 0',
    );
    expect(
      () =>
        new MultiInputTransformerWrapper({
          numTokens: { note: 10 },
          maxSeqLen: 6,
          numMemoryTokens: 1,
          memoryTokensInterspersedEvery: 2,
          attnLayers: new Encoder({ dim: 8, depth: 1, heads: 2, attnDimHead: 4 }),
        }),
    ).toThrow('memoryTokensInterspersedEvery: expected a Decoder (causal attention layers), got Encoder');
    const m = make();
    const note = tf.tensor2d([[1, 2]], [1, 2], 'int32');
    const vel = tf.tensor2d([[1, 4]], [1, 2], 'int32');
    const short = tf.tensor2d([[1]], [1, 1], 'int32');
    expect(() => m.forward({ note })).toThrow(
      'x: expected ids for exactly the inputs (note, vel), got (note)',
    );
    expect(() => m.forward({ note, vel })).toThrow('x.vel: expected ids in [0, 4), got 4');
    expect(() => m.forward({ note, vel: short })).toThrow('x.vel: expected shape [1, 2], got [1, 1]');
    tf.dispose([note, vel, short]);
    m.dispose();
  });

  it('builds from JSON with snake_case keys and gives its config back', () => {
    const json = {
      wrapper: 'MultiInputTransformerWrapper',
      num_tokens: { note: 10, vel: 4 },
      max_seq_len: 6,
      post_emb_norm: true,
      attn_layers: { type: 'Decoder', dim: 8, depth: 1, heads: 2, attn_dim_head: 4 },
    };
    const m = fromConfig(json) as MultiInputTransformerWrapper;
    expect(m).toBeInstanceOf(MultiInputTransformerWrapper);
    expect(toConfig(m)).toEqual({
      wrapper: 'MultiInputTransformerWrapper',
      numTokens: { note: 10, vel: 4 },
      maxSeqLen: 6,
      postEmbNorm: true,
      attnLayers: { type: 'Decoder', dim: 8, depth: 1, heads: 2, attnDimHead: 4 },
    });
    m.dispose();
    expect(() => fromConfig({ ...json, num_tokens: 10 })).toThrow(
      'numTokens: expected an object of positive integers by input name (at least one), got 10',
    );
    expect(() => fromConfig({ ...json, emb_dropout: 2 })).toThrow(
      'embDropout: expected a number in [0, 1), got 2',
    );
  });
});
