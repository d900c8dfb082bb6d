import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import { afterAll, beforeAll } from 'vitest';
import { registerTorchBackend } from '../../src/backend/torch/register.js';

/** Makes the torch backend the active one for the file's tests, and restores the previous one after. */
export function useTorchBackend(): void {
  let previous = '';
  beforeAll(async () => {
    previous = tf.getBackend();
    const r = registerTorchBackend();
    if (!r.ok) throw new Error(r.reason);
    await tf.setBackend('torch');
  });
  afterAll(async () => {
    if (previous) await tf.setBackend(previous);
  });
}
