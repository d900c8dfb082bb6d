import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { loadSafetensors, parseSafetensors, saveSafetensors } from '../../src/io/safetensors.js';

function file(header: object, data: Uint8Array): Uint8Array {
  const h = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + h.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(h.length), true);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  return out;
}

describe('safetensors', () => {
  it('round-trips float32, int32 and bool with metadata', () => {
    const t = {
      a: tf.tensor2d([
        [1.5, -2],
        [3, 4],
      ]),
      b: tf.tensor1d([7, -8], 'int32'),
      c: tf.tensor1d([true, false, true], 'bool'),
    };
    const buf = saveSafetensors(t, { note: 'x' });
    const back = loadSafetensors(buf);
    expect(back.metadata).toEqual({ note: 'x' });
    expect(back.tensors.a!.shape).toEqual([2, 2]);
    expect(Array.from(back.tensors.a!.dataSync())).toEqual([1.5, -2, 3, 4]);
    expect(back.tensors.b!.dtype).toBe('int32');
    expect(Array.from(back.tensors.c!.dataSync())).toEqual([1, 0, 1]);
    tf.dispose([...Object.values(t), ...Object.values(back.tensors)]);
  });

  it('decodes F16, BF16 and I64', () => {
    const f16 = new Uint8Array([0x00, 0x3c, 0x00, 0xc0]); // 1, -2
    const bf16 = new Uint8Array([0x80, 0x3f, 0x40, 0x40]); // 1, 3
    const i64 = new Uint8Array(16);
    new DataView(i64.buffer).setBigInt64(0, 5n, true);
    new DataView(i64.buffer).setBigInt64(8, -3n, true);
    const data = new Uint8Array([...f16, ...bf16, ...i64]);
    const f = parseSafetensors(
      file(
        {
          h: { dtype: 'F16', shape: [2], data_offsets: [0, 4] },
          b: { dtype: 'BF16', shape: [2], data_offsets: [4, 8] },
          l: { dtype: 'I64', shape: [2], data_offsets: [8, 24] },
        },
        data,
      ),
    );
    expect(Array.from(f.tensors.get('h')!.data)).toEqual([1, -2]);
    expect(Array.from(f.tensors.get('b')!.data)).toEqual([1, 3]);
    expect(Array.from(f.tensors.get('l')!.data)).toEqual([5, -3]);
  });

  it('rejects malformed files with a clear error', () => {
    expect(() => parseSafetensors(new Uint8Array(4))).toThrow(/too short/);
    const bad = new Uint8Array(16);
    new DataView(bad.buffer).setBigUint64(0, 1000n, true);
    expect(() => parseSafetensors(bad)).toThrow(/bad header length 1000/);
    expect(() =>
      parseSafetensors(file({ x: { dtype: 'Q8', shape: [1], data_offsets: [0, 1] } }, new Uint8Array(1))),
    ).toThrow(/unknown dtype "Q8"/);
    expect(() =>
      parseSafetensors(file({ x: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } }, new Uint8Array(4))),
    ).toThrow(/out of range/);
    expect(() =>
      parseSafetensors(file({ x: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, new Uint8Array(8))),
    ).toThrow(/needs 12/);
    const good = saveSafetensors({ a: tf.ones([4]) });
    expect(() => parseSafetensors(good.subarray(0, good.length - 3))).toThrow(/out of range/);
  });
});
