/**
 * Native kernels of the `torch` backend, and the cpu fallback for every other kernel.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { DataType, KernelConfig, KernelFunc, NamedAttrMap, TensorInfo } from '@tensorflow/tfjs-core';
import { backend_util, slice_util, util } from '@tensorflow/tfjs-core';
import { TorchBackend, dtypeCode } from './backend.js';
import { isBackendKv, type BackendKv, type KvEntry } from '../../attention/types.js';

type Inputs = Record<string, TensorInfo | null | undefined> | TensorInfo[];
type Impl = (b: TorchBackend, inputs: Inputs, attrs: NamedAttrMap) => TensorInfo | TensorInfo[];

const BACKEND = 'torch';

/** Kernel names implemented natively (filled by registerTorchKernels). */
export const NATIVE_KERNELS = new Set<string>();
/** Kernel names that ran through the cpu fallback so far. */
export const FALLBACK_USED = new Set<string>();

function inp(inputs: Inputs, name: string): TensorInfo {
  const t = (inputs as Record<string, TensorInfo | null | undefined>)[name];
  if (t == null) throw new Error(`torch backend: missing input ${name}`);
  return t;
}

function list(inputs: Inputs): TensorInfo[] {
  return Array.isArray(inputs) ? inputs : Object.values(inputs).filter((t): t is TensorInfo => t != null);
}

const UNARY: Record<string, number> = {
  Neg: 0,
  Abs: 1,
  Exp: 2,
  Log: 3,
  Sqrt: 4,
  Rsqrt: 5,
  Square: 6,
  Reciprocal: 7,
  Sign: 8,
  Tanh: 9,
  Sigmoid: 10,
  Relu: 11,
  Erf: 12,
  Floor: 13,
  Ceil: 14,
  Round: 15,
  Sin: 16,
  Cos: 17,
  LogicalNot: 18,
  Log1p: 19,
  Expm1: 20,
  IsNan: 21,
  IsInf: 22,
  IsFinite: 23,
  Softplus: 24,
  Elu: 25,
  Selu: 26,
  Relu6: 27,
  Atan: 30,
  Asin: 31,
  Acos: 32,
  Sinh: 33,
  Cosh: 34,
  Tan: 35,
  Asinh: 36,
  Acosh: 37,
  Atanh: 38,
};

const BINARY: Record<string, number> = {
  Add: 0,
  Sub: 1,
  Multiply: 2,
  RealDiv: 3,
  FloorDiv: 4,
  Mod: 5,
  Pow: 6,
  Maximum: 7,
  Minimum: 8,
  SquaredDifference: 9,
  Equal: 10,
  NotEqual: 11,
  Less: 12,
  LessEqual: 13,
  Greater: 14,
  GreaterEqual: 15,
  LogicalAnd: 16,
  LogicalOr: 17,
  Atan2: 18,
  DivNoNan: 19,
  LogicalXor: 21,
};

const REDUCE: Record<string, number> = { Sum: 0, Mean: 1, Max: 2, Min: 3, Prod: 4, All: 5, Any: 6 };

function axes(axis: number | number[] | undefined | null, shape: number[]): number[] {
  if (axis == null) return shape.map((_, i) => i);
  // one in-range integer axis (the common case): the result of parseAxisParam without its checks
  const rank = shape.length;
  if (typeof axis === 'number' && Number.isInteger(axis) && axis >= -rank && axis < rank)
    return [axis < 0 ? axis + rank : axis];
  return util.parseAxisParam(axis, shape);
}

function upcastFloat(dtype: DataType): DataType {
  return dtype === 'float32' ? 'float32' : dtype;
}

/** The ids of the inputs every decoding kernel takes: x, wq, wk, wv, wo. */
function decodeIds(b: TorchBackend, i: Inputs): [number, number, number, number, number] {
  return [b.id(inp(i, 'x')), b.id(inp(i, 'wq')), b.id(inp(i, 'wk')), b.id(inp(i, 'wv')), b.id(inp(i, 'wo'))];
}

const IMPLS: Record<string, Impl> = {
  Cast: (b, i, a) => {
    const x = inp(i, 'x');
    const dtype = a.dtype as DataType;
    return b.out(b.N.cast(b.id(x), dtypeCode(dtype)));
  },
  Identity: (b, i) => {
    const x = inp(i, 'x');
    b.incRef(x.dataId);
    return { dataId: x.dataId, shape: x.shape, dtype: x.dtype };
  },
  Reshape: (b, i, a) => {
    const x = inp(i, 'x');
    const size = util.sizeFromShape(x.shape);
    const shape = util.inferFromImplicitShape(a.shape as number[], size);
    return b.outAs(b.N.reshape(b.id(x), shape), shape, x.dtype);
  },
  Transpose: (b, i, a) => {
    const x = inp(i, 'x');
    const perm = a.perm as number[];
    return b.outAs(
      b.N.transpose(b.id(x), perm),
      perm.map((p) => x.shape[p]),
      x.dtype,
    );
  },
  ExpandDims: (b, i, a) => {
    const x = inp(i, 'input');
    let dim = a.dim as number;
    const rank = x.shape.length;
    if (dim < -(rank + 1) || dim > rank)
      throw new Error(`Axis must be in the interval [${-(rank + 1)}, ${rank}]`);
    if (dim < 0) dim = rank + 1 + dim;
    const shape = x.shape.slice();
    shape.splice(dim, 0, 1);
    return b.outAs(b.N.reshape(b.id(x), shape), shape, x.dtype);
  },
  BroadcastTo: (b, i, a) => {
    const x = inp(i, 'x');
    const shape = a.shape as number[];
    const xs = [...new Array<number>(Math.max(0, shape.length - x.shape.length)).fill(1), ...x.shape];
    const rid = b.N.reshape(b.id(x), xs);
    const out = b.N.broadcastTo(rid, shape);
    b.N.free(rid);
    return b.outAs(out, shape.slice(), x.dtype);
  },
  BatchMatMul: (b, i, a) => {
    const x = inp(i, 'a');
    const y = inp(i, 'b');
    if (x.shape.length < 2 || y.shape.length < 2)
      throw new Error(
        `Error in matMul: inputs must have rank at least 2, got ranks ${x.shape.length} and ${y.shape.length}.`,
      );
    return b.out(b.N.matmul(b.id(x), b.id(y), Boolean(a.transposeA), Boolean(a.transposeB)));
  },
  _FusedMatMul: (b, i, a) => {
    const acts: Record<string, number> = { linear: 0, relu: 1, relu6: 2, elu: 3, leakyrelu: 4, sigmoid: 5 };
    const act = acts[(a.activation as string) ?? 'linear'];
    const bias = (i as Record<string, TensorInfo | undefined>).bias;
    if (act === undefined) return fallbackRun(b, '_FusedMatMul', i, a);
    return b.out(
      b.N.matmul(
        b.id(inp(i, 'a')),
        b.id(inp(i, 'b')),
        Boolean(a.transposeA),
        Boolean(a.transposeB),
        bias ? b.id(bias) : -1,
        act,
        (a.leakyreluAlpha as number | undefined) ?? 0.2,
      ),
    );
  },
  Softmax: (b, i, a) => {
    const x = inp(i, 'logits');
    const dim = (a.dim as number) < 0 ? x.shape.length + (a.dim as number) : (a.dim as number);
    return b.out(b.N.softmax(b.id(x), dim, false));
  },
  LogSoftmax: (b, i, a) => {
    const x = inp(i, 'logits');
    const dim = (a.axis as number) < 0 ? x.shape.length + (a.axis as number) : (a.axis as number);
    return b.out(b.N.softmax(b.id(x), dim, true));
  },
  ArgMax: (b, i, a) => {
    const x = inp(i, 'x');
    return b.out(b.N.argReduce(0, b.id(x), axes(a.axis as number, x.shape)[0]));
  },
  ArgMin: (b, i, a) => {
    const x = inp(i, 'x');
    return b.out(b.N.argReduce(1, b.id(x), axes(a.axis as number, x.shape)[0]));
  },
  Concat: (b, i, a) => {
    const ts = list(i);
    const axis = axes(a.axis as number, ts[0].shape)[0];
    if (ts.length === 1) return IMPLS.Identity(b, { x: ts[0] }, {});
    return b.out(
      b.N.concat(
        ts.map((t) => b.id(t)),
        axis,
      ),
    );
  },
  Pack: (b, i, a) => {
    const ts = list(i);
    for (const t of ts)
      if (t.dtype !== ts[0].dtype) throw new Error(`All tensors passed to stack must have matching dtypes`);
    const axis = (a.axis as number) < 0 ? ts[0].shape.length + 1 + (a.axis as number) : (a.axis as number);
    return b.out(
      b.N.stack(
        ts.map((t) => b.id(t)),
        axis,
      ),
    );
  },
  Unpack: (b, i, a) => {
    const x = inp(i, 'value');
    const axis = axes(a.axis as number, x.shape)[0];
    const shape = x.shape.filter((_, d) => d !== axis);
    return b.N.unstack(b.id(x), axis).map((id) => b.outAs(id, shape.slice(), x.dtype));
  },
  SplitV: (b, i, a) => {
    const x = inp(i, 'x');
    const axis = axes(a.axis as number, x.shape)[0];
    const sizes = backend_util.prepareSplitSize(
      x as tf.Tensor,
      a.numOrSizeSplits as number[] | number,
      axis,
    ) as number[];
    return b.N.split(b.id(x), sizes, axis).map((id, k) => {
      const shape = x.shape.slice();
      shape[axis] = sizes[k];
      return b.outAs(id, shape, x.dtype);
    });
  },
  Slice: (b, i, a) => {
    const x = inp(i, 'x');
    const [begin, size] = slice_util.parseSliceParams(x, a.begin as number[], a.size as number[]);
    slice_util.assertParamsValid(x, begin, size);
    return b.outAs(b.N.slice(b.id(x), begin, size), size, x.dtype);
  },
  StridedSlice: (b, i, a) => {
    const x = inp(i, 'x');
    const info = slice_util.sliceInfo(
      x.shape,
      a.begin as number[],
      a.end as number[],
      a.strides as number[],
      a.beginMask as number,
      a.endMask as number,
      a.ellipsisMask as number,
      a.newAxisMask as number,
      a.shrinkAxisMask as number,
    );
    const { finalShape, isIdentity, isSimpleSlice, begin, end, strides } = info;
    if (isIdentity) return b.outAs(b.N.reshape(b.id(x), finalShape), finalShape, x.dtype);
    let sid: number;
    if (info.sliceDim0 || isSimpleSlice) {
      sid = b.N.slice(b.id(x), begin, slice_util.computeOutShape(begin, end, strides));
    } else if (finalShape.some((d) => d === 0)) {
      sid = b.N.fill(finalShape, 0, dtypeCode(x.dtype));
      return b.outAs(sid, finalShape, x.dtype);
    } else {
      sid = b.N.stridedSlice(b.id(x), begin, strides, slice_util.computeOutShape(begin, end, strides));
    }
    const out = b.N.reshape(sid, finalShape);
    b.N.free(sid);
    return b.outAs(out, finalShape, x.dtype);
  },
  PadV2: (b, i, a) => {
    const x = inp(i, 'x');
    const p = a.paddings as Array<[number, number]>;
    return b.out(b.N.pad(b.id(x), p.flat(), a.constantValue as number));
  },
  MirrorPad: (b, i, a) => {
    const x = inp(i, 'x');
    const p = a.paddings as Array<[number, number]>;
    return b.out(b.N.mirrorPad(b.id(x), p.flat(), a.mode === 'symmetric'));
  },
  Tile: (b, i, a) => b.out(b.N.tile(b.id(inp(i, 'x')), a.reps as number[])),
  Reverse: (b, i, a) => {
    const x = inp(i, 'x');
    return b.out(b.N.reverse(b.id(x), axes(a.dims as number[], x.shape)));
  },
  GatherV2: (b, i, a) => {
    const x = inp(i, 'x');
    const idx = inp(i, 'indices');
    if ((a.batchDims as number) !== 0) return fallbackRun(b, 'GatherV2', i, a);
    const axis = axes(a.axis as number, x.shape)[0];
    return b.out(b.N.gather(b.id(x), b.id(idx), axis));
  },
  GatherNd: (b, i) => b.out(b.N.gatherNd(b.id(inp(i, 'params')), b.id(inp(i, 'indices')))),
  ScatterNd: (b, i, a) =>
    b.out(b.N.scatterNd(b.id(inp(i, 'indices')), b.id(inp(i, 'updates')), a.shape as number[])),
  UnsortedSegmentSum: (b, i, a) =>
    b.out(b.N.segmentSum(b.id(inp(i, 'x')), b.id(inp(i, 'segmentIds')), a.numSegments as number)),
  OneHot: (b, i, a) =>
    b.out(
      b.N.oneHot(
        b.id(inp(i, 'indices')),
        a.depth as number,
        a.onValue as number,
        a.offValue as number,
        dtypeCode((a.dtype as DataType) ?? 'int32'),
      ),
    ),
  TopK: (b, i, a) => {
    const x = inp(i, 'x');
    const k = a.k as number;
    const shape = x.shape.slice();
    shape[shape.length - 1] = k;
    const [v, ix] = b.N.topk(b.id(x), k, a.sorted !== false);
    return [b.outAs(v, shape, x.dtype), b.outAs(ix, shape.slice(), 'int32')];
  },
  Cumsum: (b, i, a) => {
    const x = inp(i, 'x');
    const axis = axes(a.axis as number, x.shape)[0];
    return b.out(b.N.cumulative(b.id(x), axis, Boolean(a.exclusive), Boolean(a.reverse), false));
  },
  Cumprod: (b, i, a) => {
    const x = inp(i, 'x');
    const axis = axes(a.axis as number, x.shape)[0];
    return b.out(b.N.cumulative(b.id(x), axis, Boolean(a.exclusive), Boolean(a.reverse), true));
  },
  Fill: (b, i, a) => {
    const dtype = (a.dtype as DataType) ?? 'float32';
    if (typeof a.value === 'string' || dtype === 'string') return fallbackRun(b, 'Fill', i, a);
    return b.out(b.N.fill(a.shape as number[], a.value as number, dtypeCode(dtype)));
  },
  ZerosLike: (b, i) => b.out(b.N.fillLike(b.id(inp(i, 'x')), 0)),
  OnesLike: (b, i) => b.out(b.N.fillLike(b.id(inp(i, 'x')), 1)),
  Range: (b, _i, a) => {
    const start = a.start as number;
    const stop = a.stop as number;
    const step = a.step as number;
    const dtype = (a.dtype as DataType) ?? 'float32';
    const vals = rangeValues(start, stop, step, dtype);
    return b.makeTensorInfo([vals.length], dtype, vals);
  },
  LinSpace: (b, _i, a) => {
    const start = a.start as number;
    const stop = a.stop as number;
    const num = a.num as number;
    const vals = new Float32Array(num);
    const step = num > 1 ? (stop - start) / (num - 1) : 0;
    vals[0] = start;
    for (let k = 1; k < num; k++) vals[k] = vals[k - 1] + step;
    return b.makeTensorInfo([num], 'float32', vals);
  },
  Select: (b, i) => {
    const c = inp(i, 'condition');
    const t = inp(i, 't');
    const e = inp(i, 'e');
    let cid = b.id(c);
    let tmp = -1;
    if (c.shape.length === 1 && t.shape.length > 1) {
      tmp = b.N.reshape(cid, [c.shape[0], ...new Array<number>(t.shape.length - 1).fill(1)]);
      cid = tmp;
    }
    const out = b.N.where(cid, b.id(t), b.id(e));
    if (tmp >= 0) b.N.free(tmp);
    return b.outAs(out, t.shape.slice(), upcastFloat(t.dtype));
  },
  ClipByValue: (b, i, a) =>
    b.out(b.N.clip(b.id(inp(i, 'x')), a.clipValueMin as number, a.clipValueMax as number)),
  Step: (b, i, a) => b.out(b.N.unary(28, b.id(inp(i, 'x')), (a.alpha as number) ?? 0)),
  LeakyRelu: (b, i, a) => b.out(b.N.unary(29, b.id(inp(i, 'x')), a.alpha as number)),
  Prelu: (b, i) => b.out(b.N.binary(20, b.id(inp(i, 'x')), b.id(inp(i, 'alpha')))),
  AddN: (b, i) => b.out(b.N.addN(list(i).map((t) => b.id(t)))),
  Einsum: (b, i, a) =>
    b.out(
      b.N.einsum(
        a.equation as string,
        list(i).map((t) => b.id(t)),
      ),
    ),
  Multinomial: (b, i, a) =>
    b.out(
      b.N.multinomial(
        b.id(inp(i, 'logits')),
        a.numSamples as number,
        (a.seed as number | undefined) ?? Math.floor(Math.random() * 2 ** 31),
        Boolean(a.normalized),
      ),
    ),
  Conv2D: (b, i, a) => {
    const x = inp(i, 'x');
    const f = inp(i, 'filter');
    if ((a.dataFormat ?? 'NHWC') !== 'NHWC') return fallbackRun(b, 'Conv2D', i, a);
    if (x.shape[3] !== f.shape[2])
      throw new Error(
        `Error in conv2d: depth of input (${x.shape[3]}) must match input depth for filter ${f.shape[2]}.`,
      );
    const info = backend_util.computeConv2DInfo(
      x.shape as [number, number, number, number],
      f.shape as [number, number, number, number],
      a.strides as number | [number, number],
      a.dilations as number | [number, number],
      a.pad as 'valid' | 'same' | number,
      a.dimRoundingMode as 'floor' | 'round' | 'ceil' | undefined,
    );
    const p = info.padInfo;
    return b.out(
      b.N.conv2d(
        b.id(x),
        b.id(f),
        [info.strideHeight, info.strideWidth],
        [p.top, p.bottom, p.left, p.right],
        [info.dilationHeight, info.dilationWidth],
      ),
    );
  },
  XtAttention: (b, i, a) => {
    const mask = (i as Record<string, TensorInfo | null | undefined>).mask;
    return b.out(
      b.N.attention(
        b.id(inp(i, 'q')),
        b.id(inp(i, 'k')),
        b.id(inp(i, 'v')),
        mask ? b.id(mask) : -1,
        a.scale as number,
        Boolean(a.causal),
      ),
    );
  },
  XtCachedAttention: (b, i, a) => {
    const named = i as Record<string, TensorInfo | null | undefined>;
    const opt = (k: string): number => (named[k] ? b.id(named[k]!) : -1);
    const heads = a.heads as number;
    const ids = b.N.cachedAttention(
      ...decodeIds(b, i),
      opt('kCache'),
      opt('vCache'),
      opt('cos'),
      opt('sin'),
      opt('cosQ'),
      opt('sinQ'),
      a.scale as number,
      heads,
      Boolean(a.causal),
      Boolean(a.flash),
    );
    const [bb, n] = inp(i, 'x').shape as [number, number];
    // without a cache, nothing cached: t = 0
    const t = named.kCache ? named.kCache.shape[2]! : 0;
    const d = inp(i, 'wk').shape[0]! / heads;
    const dv = inp(i, 'wv').shape[0]! / heads;
    return [
      b.outAs(ids[0]!, [bb, n, inp(i, 'wo').shape[0]!], 'float32'),
      b.outAs(ids[1]!, [bb, heads, t + n, d], 'float32'),
      b.outAs(ids[2]!, [bb, heads, t + n, dv], 'float32'),
      b.outAs(ids[3]!, [bb, heads, n, dv], 'float32'),
    ];
  },
  XtCachedAttentionRows: (b, i, a) => {
    const entries = a.entries as unknown as KvEntry[];
    const tables = a.tables as unknown as ({ cos: TensorInfo; sin: TensorInfo } | null)[] | null;
    const kvOut = a.kvOut as unknown as BackendKv[];
    const rows = entries.length;
    const kIds = new Int32Array(rows);
    const vIds = new Int32Array(rows);
    const cos = new Int32Array(rows);
    const sin = new Int32Array(rows);
    for (let r = 0; r < rows; r++) {
      const e = entries[r]!;
      kIds[r] = isBackendKv(e) ? e.k : b.id(e.k);
      vIds[r] = isBackendKv(e) ? e.v : b.id(e.v);
      const t = tables?.[r];
      cos[r] = t ? b.id(t.cos) : -1;
      sin[r] = t ? b.id(t.sin) : -1;
    }
    const out = b.N.cachedAttentionRows(
      ...decodeIds(b, i),
      kIds,
      vIds,
      cos,
      sin,
      a.scale as number,
      a.heads as number,
    );
    // each row's new keys and values stay ids: the caller's cache owns them
    for (let r = 0; r < rows; r++) {
      const e = entries[r]!;
      const [h, t, d, dv] = isBackendKv(e)
        ? [e.kShape[1]!, e.kShape[2]!, e.kShape[3]!, e.vShape[3]!]
        : [e.k.shape[1]!, e.k.shape[2]!, e.k.shape[3]!, e.v.shape[3]!];
      kvOut.push({
        k: out[1 + 2 * r]!,
        v: out[2 + 2 * r]!,
        kShape: [1, h, t + 1, d],
        vShape: [1, h, t + 1, dv],
      });
    }
    return [b.outAs(out[0]!, [rows, 1, inp(i, 'wo').shape[0]!], 'float32')];
  },
  XtLinear: (b, i) =>
    b.out(b.N.matmul(b.id(inp(i, 'x')), b.id(inp(i, 'w')), false, true, b.id(inp(i, 'bias')), 0)),
  XtLayerNorm: (b, i, a) =>
    b.out(
      b.N.layerNorm(
        b.id(inp(i, 'x')),
        b.id(inp(i, 'gamma')),
        a.epsilon as number,
        (a.gammaOffset as number | undefined) ?? 0,
      ),
    ),
  XtLayerNormGrad: (b, i, a) => {
    const x = inp(i, 'x');
    const gamma = inp(i, 'gamma');
    const ids = b.N.layerNormGrad(
      b.id(inp(i, 'dy')),
      b.id(x),
      b.id(gamma),
      a.epsilon as number,
      (a.gammaOffset as number | undefined) ?? 0,
    );
    return [b.outAs(ids[0], x.shape.slice(), 'float32'), b.outAs(ids[1], gamma.shape.slice(), 'float32')];
  },
  XtGelu: (b, i) => b.out(b.N.unary(40, b.id(inp(i, 'x')))),
  XtGeluGrad: (b, i) => b.out(b.N.geluGrad(b.id(inp(i, 'dy')), b.id(inp(i, 'x')))),
  XtRotary: (b, i, a) =>
    b.out(b.N.rotary(b.id(inp(i, 'x')), b.id(inp(i, 'cos')), b.id(inp(i, 'sin')), Boolean(a.transpose))),
  XtCrossEntropy: (b, i, a) => {
    const logits = inp(i, 'logits');
    const [n, c] = logits.shape as [number, number];
    const [losses, logp] = b.N.crossEntropy(b.id(logits), b.id(inp(i, 'target')), a.ignoreIndex as number);
    return [b.outAs(losses!, [n], 'float32'), b.outAs(logp!, [n, c], 'float32')];
  },
  XtCrossEntropyGrad: (b, i, a) => {
    const logp = inp(i, 'logp');
    return b.outAs(
      b.N.crossEntropyGrad(b.id(inp(i, 'dy')), b.id(logp), b.id(inp(i, 'target')), a.ignoreIndex as number),
      logp.shape.slice(),
      'float32',
    );
  },
  XtAdamW: (b, i, a) => {
    const named = i as Record<string, TensorInfo>;
    const count = (a.decay as number[]).length;
    const t = (k: string, j: number): TensorInfo => inp(named, `${k}${j}`);
    const ids = (k: string): number[] => Array.from({ length: count }, (_, j) => b.id(t(k, j)));
    // p, m and v may be updated in place when nothing else in JavaScript holds their data
    const exclusive = Array.from({ length: count }, (_, j) =>
      ['p', 'm', 'v'].every((k) => b.refCount(t(k, j).dataId) === 1) ? 1 : 0,
    );
    const out = b.N.adamW(
      ids('p'),
      ids('g'),
      ids('m'),
      ids('v'),
      a.decay as number[],
      exclusive,
      a.beta1 as number,
      a.beta2 as number,
      a.eps as number,
      a.stepSize as number,
      a.sqrtBc2 as number,
      a.decayFactor as number,
    );
    return out.map((id, k) => {
      const src = t(['p', 'm', 'v'][k % 3]!, Math.floor(k / 3));
      if (id >= 0) return b.outAs(id, src.shape.slice(), 'float32');
      // updated in place: the same data, one more reference (as Identity)
      b.incRef(src.dataId);
      return { dataId: src.dataId, shape: src.shape.slice(), dtype: src.dtype };
    });
  },
  XtTopKFilter: (b, i, a) => b.out(b.N.topKFilter(b.id(inp(i, 'logits')), a.k as number)),
  XtTopPFilter: (b, i, a) => b.out(b.N.topPFilter(b.id(inp(i, 'logits')), a.thres as number)),
  XtSampleRows: (b, i, a) => {
    const probs = inp(i, 'probs');
    return b.outAs(
      b.N.sampleRows(b.id(probs), a.draws as unknown as Float64Array),
      [probs.shape[0]!],
      'int32',
    );
  },
  XtRandomFill: (b, _i, a) => {
    const shape = (a.shape as number[]).slice();
    return b.outAs(
      b.N.randomFill(
        a.kind as number,
        shape,
        a.a as number,
        a.b as number,
        a.state as unknown as Float64Array,
      ),
      shape,
      'float32',
    );
  },
  XtAttentionGrad: (b, i, a) => {
    const mask = (i as Record<string, TensorInfo | null | undefined>).mask;
    const q = inp(i, 'q');
    const k = inp(i, 'k');
    const v = inp(i, 'v');
    const ids = b.N.attentionGrad(
      b.id(inp(i, 'dy')),
      b.id(q),
      b.id(k),
      b.id(v),
      mask ? b.id(mask) : -1,
      a.scale as number,
      Boolean(a.causal),
    );
    return [
      b.outAs(ids[0], q.shape.slice(), 'float32'),
      b.outAs(ids[1], k.shape.slice(), 'float32'),
      b.outAs(ids[2], v.shape.slice(), 'float32'),
    ];
  },
};

function rangeValues(start: number, stop: number, step: number, dtype: DataType): Float32Array | Int32Array {
  if (start === stop || (start < stop && step < 0) || (stop < start && step > 1)) {
    return dtype === 'int32' ? new Int32Array(0) : new Float32Array(0);
  }
  const n = Math.abs(Math.ceil((stop - start) / step));
  const vals = dtype === 'int32' ? new Int32Array(n) : new Float32Array(n);
  if (stop < start && step === 1) step = -1;
  if (n > 0) vals[0] = start;
  for (let k = 1; k < n; k++) vals[k] = vals[k - 1] + step;
  return vals;
}

for (const [name, op] of Object.entries(UNARY)) {
  IMPLS[name] = (b, i) => b.out(b.N.unary(op, b.id(inp(i, 'x'))));
}
for (const [name, op] of Object.entries(BINARY)) {
  IMPLS[name] = (b, i) => b.out(b.N.binary(op, b.id(inp(i, 'a')), b.id(inp(i, 'b'))));
}
for (const [name, op] of Object.entries(REDUCE)) {
  IMPLS[name] = (b, i, a) => {
    const x = inp(i, 'x');
    const ax = (name === 'Max' ? a.reductionIndices : a.axis) as number | number[];
    return b.out(b.N.reduce(op, b.id(x), axes(ax, x.shape), Boolean(a.keepDims)));
  };
}

// ---------------------------------------------------------------------------------------------
// cpu fallback

let cpuBackend: tf.KernelBackend | null = null;
const warned = new Set<string>();

function getCpu(): tf.KernelBackend {
  if (!cpuBackend) {
    const be = tf.findBackend('cpu');
    if (!be)
      throw new Error('torch backend: the cpu backend (fallback for missing kernels) is not registered');
    cpuBackend = be;
    // it would print advice to install tfjs-node on its first write
    if ('firstUse' in be) (be as { firstUse: boolean }).firstUse = false;
  }
  return cpuBackend;
}

/** Runs kernel `name` on the cpu backend: copies inputs there, runs, copies outputs back. */
export function fallbackRun(
  b: TorchBackend,
  name: string,
  inputs: Inputs,
  attrs: NamedAttrMap,
): TensorInfo | TensorInfo[] {
  const cfg = tf.getKernel(name, 'cpu');
  if (!cfg) throw new Error(`torch backend: kernel ${name} is implemented neither natively nor on cpu`);
  FALLBACK_USED.add(name);
  if (!warned.has(name)) {
    warned.add(name);
    if (!process.env.XT_QUIET_FALLBACK)
      process.stderr.write(`x-transformers: torch backend runs kernel ${name} on the cpu fallback\n`);
  }
  const cpu = getCpu();
  const made: object[] = [];
  const move = (t: TensorInfo | null | undefined): TensorInfo | null | undefined => {
    if (t == null) return t;
    const dataId = cpu.write(b.readSync(t.dataId), t.shape, t.dtype);
    made.push(dataId);
    // cpu kernels may read `rank` of their inputs (ops pass whole tensors)
    return { dataId, shape: t.shape, dtype: t.dtype, rank: t.shape.length } as TensorInfo;
  };
  const cpuInputs = (Array.isArray(inputs)
    ? inputs.map((t) => move(t) as TensorInfo)
    : Object.fromEntries(
        Object.entries(inputs).map(([k, t]) => [
          k,
          // some kernels (ragged ops) take a list of tensors under one name
          Array.isArray(t) ? (t as TensorInfo[]).map((u) => move(u)) : move(t),
        ]),
      )) as unknown as Inputs;
  try {
    const out = (cfg.kernelFunc as KernelFunc)({
      inputs: cpuInputs as tf.NamedTensorInfoMap,
      attrs,
      backend: cpu,
    });
    const outs = Array.isArray(out) ? out : [out];
    const res = outs.map((o) => {
      const values = cpu.readSync(o.dataId) as Float32Array | Int32Array | Uint8Array;
      return b.makeTensorInfo(o.shape, o.dtype, values);
    });
    for (const o of outs) if (!made.includes(o.dataId)) made.push(o.dataId);
    return Array.isArray(out) ? res : res[0];
  } finally {
    for (const d of made) cpu.disposeData(d, true);
  }
}

/** Registers the native kernels, then a cpu fallback for every other kernel the cpu backend has. */
export function registerTorchKernels(): void {
  for (const [name, impl] of Object.entries(IMPLS)) {
    if (tf.getKernel(name, BACKEND)) continue;
    const cfg: KernelConfig = {
      kernelName: name,
      backendName: BACKEND,
      kernelFunc: ({ inputs, backend, attrs }) =>
        impl(backend as TorchBackend, inputs as Inputs, attrs ?? {}),
    };
    tf.registerKernel(cfg);
    NATIVE_KERNELS.add(name);
  }
  for (const cfg of tf.getKernelsForBackend('cpu')) {
    const name = cfg.kernelName;
    if (tf.getKernel(name, BACKEND)) continue;
    tf.registerKernel({
      kernelName: name,
      backendName: BACKEND,
      kernelFunc: ({ inputs, backend, attrs }) =>
        fallbackRun(backend as TorchBackend, name, inputs as Inputs, attrs ?? {}),
    });
  }
}
