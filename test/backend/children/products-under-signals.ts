/**
 * A child process for torch-signals.test.ts: float32 products on the torch backend (large enough
 * for oneDNN's sgemm), again and again, while its parent sends it signals (and, with --cpu-prof,
 * V8's sampler sends SIGPROF to this thread). Prints 'ready' once the backend is up, then one JSON
 * line: how many products it made, how many signals its handler saw, and whether every product
 * equalled the first one; exits when its stdin ends. With the argument `masks`, prints instead how
 * many of its threads block SIGUSR2 after one product, and exits.
 */
import { readdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import * as tf from '@tensorflow/tfjs-core';
import { registerTorchBackend } from '../../../src/backend/torch/register.js';

const r = registerTorchBackend();
if (!r.ok) throw new Error(r.reason);
await tf.setBackend('torch');
let signals = 0;
process.on('SIGUSR2', () => signals++);
const a = tf.randomNormal([96, 256], 0, 1, 'float32', 1);
const b = tf.randomNormal([256, 384], 0, 1, 'float32', 2);
const first = tf.matMul(a, b).dataSync().slice();
if (process.argv[2] === 'masks') {
  // how many of this process's threads block SIGUSR2 now (outside any product), from /proc
  const bit = 1n << BigInt(os.constants.signals.SIGUSR2 - 1);
  const blocking = readdirSync('/proc/self/task').filter((tid) => {
    const status = readFileSync(`/proc/self/task/${tid}/status`, 'utf8');
    return (BigInt('0x' + /^SigBlk:\s*([0-9a-f]+)/m.exec(status)![1]!) & bit) !== 0n;
  }).length;
  process.stdout.write(JSON.stringify({ blocking }) + '\n');
  process.exit(0);
}
process.stdout.write('ready\n');
const products = Number(process.argv[2] ?? 3000);
let same = true;
for (let i = 0; i < products; i++) {
  const c = tf.matMul(a, b);
  if (i % 100 === 0) {
    const v = c.dataSync();
    for (let j = 0; j < v.length; j++) if (v[j] !== first[j]) same = false;
  }
  c.dispose();
  // signals are handled between products, on the event loop
  if (i % 50 === 0) await new Promise((res) => setImmediate(res));
}
process.stdout.write(JSON.stringify({ products, signals, same }) + '\n');
// exits once the parent has stopped its signals (its end of stdin closed): a signal that came while
// the process exits would meet the default action
process.stdin.resume();
await new Promise((res) => process.stdin.once('end', res));
