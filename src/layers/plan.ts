import { OptionError } from '../utils/errors.js';
import type { AttentionLayersOwnOptions } from './options.js';

/** A layer of the stack: self-attention, cross-attention or feedforward. */
export type LayerType = 'a' | 'c' | 'f';

/**
 * What an AttentionLayers is made of, decided from its options alone (no tensors): the layer types,
 * the order they run in, the U-Net skips and the per-layer token shifts and dropouts. Indices are
 * layer indices (positions in `layerTypes`, as `layers.{i}` in the state dict).
 */
export interface LayersPlan {
  layerTypes: LayerType[];
  /** The layer indices in the order they run (repeats allowed: weight tying, depth extrapolation). */
  executeOrder: number[];
  /** Number of blocks, as the reference counts them (1 after weight tying). */
  depth: number;
  /** Per layer: the index of the earlier layer whose input a U-Net skip concatenates, or null. */
  skipFrom: (number | null)[];
  /** Per layer: the token shift (0: none). */
  shifts: number[];
  /** Per layer: the probability of skipping it in training. */
  layerDropouts: number[];
  numAttnLayers: number;
}

/**
 * Plans the stack of options `o` (already merged with the defaults and validated by the stack).
 * Throws an Error naming the option when they cannot make a stack.
 */
export function planLayers(o: AttentionLayersOwnOptions): LayersPlan {
  let defaultBlock: LayerType[] =
    o.crossAttend && !o.onlyCross ? ['a', 'c', 'f'] : o.crossAttend ? ['c', 'f'] : ['a', 'f'];
  if (o.macaron) defaultBlock = ['f', ...defaultBlock];

  let depth = o.depth;
  let executeOrder = o.layersExecuteOrder;
  if (o.weightTieLayers) {
    if (depth === null) throw new OptionError('depth', 'a positive integer with weightTieLayers', 'null');
    if (executeOrder) throw OptionError.of('layersExecuteOrder', 'none with weightTieLayers', executeOrder);
    executeOrder = [];
    for (let d = 0; d < depth; d++) for (let i = 0; i < defaultBlock.length; i++) executeOrder.push(i);
    depth = 1;
  }

  const { layerTypes, lenDefaultBlock } = planTypes(o, defaultBlock, depth);
  const order = executeOrder ?? layerTypes.map((_, i) => i);
  for (const i of order) {
    if (!Number.isInteger(i) || i < 0 || i >= layerTypes.length)
      throw new OptionError('layersExecuteOrder', `indices in [0, ${layerTypes.length})`, String(i));
  }
  const blocks = depth ?? order.length;
  return {
    layerTypes,
    executeOrder: order,
    depth: blocks,
    skipFrom: planSkips(o.unetSkips, layerTypes.length, blocks, lenDefaultBlock),
    shifts: castList(o.shiftTokens, layerTypes.length, 'shiftTokens'),
    layerDropouts: castList(o.layerDropout, layerTypes.length, 'layerDropout'),
    numAttnLayers: layerTypes.filter((t) => t === 'a').length,
  };
}

/** The layer types: custom, parallel (parRatio), sandwich or `depth` default blocks. */
function planTypes(
  o: AttentionLayersOwnOptions,
  defaultBlock: LayerType[],
  depth: number | null,
): { layerTypes: LayerType[]; lenDefaultBlock: number } {
  if (o.customLayers) {
    const layerTypes = o.customLayers.map((t, i) => {
      if (t !== 'a' && t !== 'c' && t !== 'f')
        throw OptionError.of('customLayers', `'a', 'c' or 'f' at index ${i}`, t);
      return t;
    });
    return { layerTypes, lenDefaultBlock: 1 };
  }
  if (o.parRatio !== null) {
    const parDepth = depth! * defaultBlock.length;
    if (!(o.parRatio > 1 && o.parRatio <= parDepth))
      throw new OptionError('parRatio', `a number in (1, ${parDepth}]`, String(o.parRatio));
    const blk = defaultBlock.filter((t) => t !== 'f');
    const parAttn = Math.floor(parDepth / o.parRatio);
    const depthCut = Math.floor((parDepth * 2) / 3);
    const parWidth = Math.floor((depthCut + Math.floor(depthCut / parAttn)) / parAttn);
    if (blk.length > parWidth)
      throw new OptionError(
        'parRatio',
        `a ratio that leaves room for the default block (${blk.length} layers)`,
        String(o.parRatio),
      );
    const parBlock = [...blk, ...Array<LayerType>(parWidth - blk.length).fill('f')];
    const head: LayerType[] = [];
    for (let i = 0; i < parAttn; i++) head.push(...parBlock);
    return {
      layerTypes: [...head, ...Array<LayerType>(parDepth - head.length).fill('f')],
      lenDefaultBlock: 1,
    };
  }
  if (o.sandwichCoef !== null) {
    if (!(o.sandwichCoef > 0 && o.sandwichCoef <= depth!))
      throw new OptionError('sandwichCoef', `an integer in [1, depth ${depth}]`, String(o.sandwichCoef));
    const layerTypes = Array<LayerType>(o.sandwichCoef).fill('a');
    for (let i = 0; i < depth! - o.sandwichCoef; i++) layerTypes.push(...defaultBlock);
    layerTypes.push(...Array<LayerType>(o.sandwichCoef).fill('f'));
    return { layerTypes, lenDefaultBlock: 1 };
  }
  if (depth === null)
    throw new OptionError('depth', 'a positive integer (or customLayers, parRatio or sandwichCoef)', 'null');
  const layerTypes: LayerType[] = [];
  for (let i = 0; i < depth; i++) layerTypes.push(...defaultBlock);
  return { layerTypes, lenDefaultBlock: defaultBlock.length };
}

/** U-Net skips: the latter half's blocks take the input of a mirrored earlier block. */
function planSkips(
  unetSkips: boolean,
  numLayers: number,
  depth: number,
  lenDefaultBlock: number,
): (number | null)[] {
  const numSkips = Math.floor(depth / lenDefaultBlock);
  if (unetSkips && numSkips === 0)
    throw new OptionError('unetSkips', 'a depth of at least 2 for U-Net skip connections', `depth ${depth}`);
  const skipIndices = Array.from({ length: numSkips }, (_, i) => i * lenDefaultBlock);
  return Array.from({ length: numLayers }, (_, ind) => {
    const latter = ind % lenDefaultBlock === 0 && Math.floor(ind / lenDefaultBlock) >= depth / 2;
    if (!unetSkips || !latter) return null;
    const from = skipIndices.pop();
    if (from === undefined) throw new Error('unetSkips: more latter-half blocks than skip sources');
    return from;
  });
}

function castList(v: number | number[], len: number, name: string): number[] {
  if (Array.isArray(v)) {
    if (v.length !== len) throw new OptionError(name, `${len} values (one per layer)`, String(v.length));
    return v;
  }
  return Array<number>(len).fill(v);
}
