/**
 * `variableGrads` with the memory of a framework that frees as it goes: TF.js's own backward pass
 * keeps every intermediate gradient and every saved forward tensor until the whole pass ends, so
 * its peak holds the gradients of all activations at once. This one walks the same tape with the
 * same gradient functions in the same order (so every number is the same, bit for bit) and frees
 * each node's output gradients and saved tensors as soon as the node is done.
 *
 * It relies on the engine's tape (`@tensorflow/tfjs-core` 4.x internals); when those are not as
 * expected, or when called inside another gradient computation, it falls back to `tf.variableGrads`.
 */
import * as tf from '@tensorflow/tfjs-core';
import { broadcastView } from '../nn/functional.js';

interface TapeNode {
  id: number;
  kernelName: string;
  outputs: tf.Tensor[];
  inputs: Record<string, tf.Tensor>;
  gradient?: (dys: (tf.Tensor | null)[]) => Record<string, () => tf.Tensor>;
  saved?: tf.Tensor[];
}

interface EngineInternals {
  state: { activeTape: TapeNode[] | null; gradientDepth: number };
  scopedRun<T>(start: () => void, end: () => void, f: () => T): T;
  startTape(): void;
  endTape(): void;
  tidy<T extends tf.TensorContainer>(name: string, f: () => T): T;
}

function engineInternals(): EngineInternals | null {
  const e = tf.engine() as unknown as Partial<EngineInternals>;
  const ok =
    typeof e.scopedRun === 'function' &&
    typeof e.startTape === 'function' &&
    typeof e.endTape === 'function' &&
    typeof e.tidy === 'function' &&
    e.state !== undefined &&
    typeof e.state.gradientDepth === 'number';
  return ok ? (e as EngineInternals) : null;
}

/** The nodes on a path from `xs` to `y`, with inputs pruned to those that depend on `xs` (as TF.js). */
function filterTape(tape: TapeNode[], xs: tf.Tensor[], y: tf.Tensor): TapeNode[] {
  const fromX = new Set<number>(xs.map((x) => x.id));
  const nodesFromX = new Set<number>();
  for (const node of tape) {
    for (const name in node.inputs) {
      if (fromX.has(node.inputs[name]!.id)) {
        for (const o of node.outputs) fromX.add(o.id);
        nodesFromX.add(node.id);
        break;
      }
    }
  }
  const toY = new Set<number>([y.id]);
  const nodesToY = new Set<number>();
  for (let i = tape.length - 1; i >= 0; i--) {
    const node = tape[i]!;
    if (node.outputs.some((o) => toY.has(o.id))) {
      for (const name in node.inputs) {
        toY.add(node.inputs[name]!.id);
        nodesToY.add(node.id);
      }
    }
  }
  const out: TapeNode[] = [];
  for (const node of tape) {
    if (!nodesFromX.has(node.id) || !nodesToY.has(node.id)) continue;
    const inputs: Record<string, tf.Tensor> = {};
    for (const name in node.inputs) if (fromX.has(node.inputs[name]!.id)) inputs[name] = node.inputs[name]!;
    out.push({ ...node, inputs, outputs: node.outputs });
  }
  return out;
}

/**
 * f: () => scalar loss; vars: the variables to differentiate (non-trainable ones are skipped) ->
 * the loss and the gradient of each trainable variable by its `name`, as `tf.variableGrads`.
 */
export function variableGradsLean(
  f: () => tf.Scalar,
  vars: tf.Variable[],
): { value: tf.Scalar; grads: tf.NamedTensorMap } {
  const engine = engineInternals();
  if (!engine || engine.state.gradientDepth !== 0) return tf.variableGrads(f, vars);
  const xs = vars.filter((v) => v.trainable);
  if (xs.length === 0) throw new Error('vars: expected at least one trainable variable, got none');

  const dropTape = (): void => {
    for (const node of engine.state.activeTape ?? []) for (const t of node.saved ?? []) t.dispose();
    engine.state.activeTape = null;
  };
  let y: tf.Tensor;
  try {
    y = engine.scopedRun(
      () => engine.startTape(),
      () => engine.endTape(),
      () => engine.tidy('forward', f),
    );
  } catch (e) {
    dropTape();
    throw e;
  }
  if (!(y instanceof tf.Tensor) || y.rank !== 0) {
    dropTape();
    if (y instanceof tf.Tensor) y.dispose();
    throw new Error(`f: expected a scalar loss, got ${y instanceof tf.Tensor ? `rank ${y.rank}` : typeof y}`);
  }
  const tape = engine.state.activeTape ?? [];
  const result = engine.tidy('backward', () => {
    const filtered = filterTape(tape, xs, y);
    // gradient of each tensor by id, and how many entries hold each gradient tensor
    const grad = new Map<number, tf.Tensor>();
    const holders = new Map<tf.Tensor, number>();
    const hold = (id: number, t: tf.Tensor): void => {
      grad.set(id, t);
      holders.set(t, (holders.get(t) ?? 0) + 1);
    };
    const release = (id: number): void => {
      const t = grad.get(id);
      if (!t) return;
      grad.delete(id);
      const n = (holders.get(t) ?? 1) - 1;
      if (n > 0) holders.set(t, n);
      else {
        holders.delete(t);
        t.dispose();
      }
    };
    hold(y.id, tf.onesLike(y));
    for (let i = filtered.length - 1; i >= 0; i--) {
      const node = filtered[i]!;
      if (!node.gradient)
        throw new Error(`Cannot compute gradient: gradient function not found for ${node.kernelName}.`);
      // an output with no gradient gets a broadcast zero (the engine would build a JavaScript
      // array of its size)
      const zeros: tf.Tensor[] = [];
      const dys = node.outputs.map((o) => {
        const g = grad.get(o.id);
        if (g) return g;
        const z = tf.tidy(() => broadcastView(tf.scalar(0, o.dtype), o.shape));
        zeros.push(z);
        return z;
      });
      const inputGrads = node.gradient(dys);
      for (const name in node.inputs) {
        const thunk = inputGrads[name];
        if (!thunk) throw new Error(`Cannot backprop through input ${name} of ${node.kernelName}.`);
        const dx = tf.tidy(thunk);
        const x = node.inputs[name]!;
        if (dx.dtype !== 'float32' || !tf.util.arraysEqual(dx.shape, x.shape))
          throw new Error(
            `Error in gradient for op ${node.kernelName}: input ${name} got a ${dx.dtype} gradient of shape [${dx.shape}], expected float32 [${x.shape}]`,
          );
        const cur = grad.get(x.id);
        if (!cur) hold(x.id, dx);
        else {
          const sum = tf.add(cur, dx);
          release(x.id);
          hold(x.id, sum);
          if (!holders.has(dx)) dx.dispose();
        }
      }
      tf.dispose(zeros);
      // this node's output gradients and saved tensors are not needed any more
      for (const o of node.outputs) release(o.id);
      for (const t of node.saved ?? []) t.dispose();
    }
    const grads: tf.NamedTensorMap = {};
    for (const v of xs) {
      const g = grad.get(v.id);
      if (g) grads[v.name] = g;
    }
    return grads;
  });
  // as the engine: free what the tape saved, then drop it
  dropTape();
  if (Object.keys(result).length === 0) {
    tf.dispose(y);
    throw new Error('vars: no variable is connected to the loss f() returns');
  }
  return { value: y as tf.Scalar, grads: result };
}
