/**
 * The `torch` TF.js backend: tensor data lives in LibTorch (ATen) tensors inside the native addon;
 * a TF.js dataId carries the addon's integer id (`xt`) and a reference count (`xrc`).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { BackendTimingInfo, DataType, TensorInfo } from '@tensorflow/tfjs-core';
import type { TorchAddon } from './native.js';

type BackendValues = Float32Array | Int32Array | Uint8Array | Uint8Array[];

/** A TF.js dataId owned by this backend. */
export interface TorchDataId {
  xt?: number;
  xrc?: number;
}

export const DTYPES = ['float32', 'int32', 'bool'] as const;
export type TorchDType = (typeof DTYPES)[number];

export function dtypeCode(dtype: DataType): number {
  switch (dtype) {
    case 'float32':
      return 0;
    case 'int32':
      return 1;
    case 'bool':
      return 2;
    default:
      throw new Error(`torch backend: dtype expected float32, int32 or bool, got ${dtype}`);
  }
}

function toTyped(values: BackendValues | null | undefined, n: number, dtype: DataType): ArrayBufferView {
  if (dtype === 'float32') {
    if (values instanceof Float32Array) return values;
    return values == null ? new Float32Array(n) : Float32Array.from(values as ArrayLike<number>);
  }
  if (dtype === 'int32') {
    if (values instanceof Int32Array) return values;
    return values == null ? new Int32Array(n) : Int32Array.from(values as ArrayLike<number>);
  }
  if (dtype === 'bool') {
    if (values instanceof Uint8Array) return values;
    const out = new Uint8Array(n);
    if (values != null) {
      const v = values as ArrayLike<number>;
      for (let i = 0; i < n; i++) out[i] = v[i] ? 1 : 0;
    }
    return out;
  }
  throw new Error(`torch backend: dtype expected float32, int32 or bool, got ${dtype}`);
}

export class TorchBackend extends tf.KernelBackend {
  /** Shared with the addon: [dtypeCode, rank, ...dims] of the last result. */
  readonly meta = new Int32Array(40);

  constructor(readonly N: TorchAddon) {
    super();
  }

  /**
   * Float32 CPU products of up to `rows` rows (at least 4) are computed row by row on the in-place
   * kernels, each row in the order it has alone; returns the previous bound. See rowStableProducts.
   */
  setRowStableRows(rows: number): number {
    return this.N.setSmallGemvRows(rows);
  }

  /** Small-op mode: ATen's ops run on one thread, large products still on all. See smallOps. */
  setSmallOps(on: boolean): boolean {
    return this.N.setSmallOps(on);
  }

  /** Mixed precision of matrix products and attention (see src/backend/precision.ts). */
  setPrecision(p: 'fp32' | 'bf16'): 'fp32' | 'bf16' {
    return this.N.setPrecision(p) as 'fp32' | 'bf16';
  }

  /** The CUDA device in use, or null on the CPU. */
  deviceInfo(): ReturnType<TorchAddon['deviceInfo']> {
    return this.N.deviceInfo();
  }

  /** TensorInfo for the addon id just returned (shape and dtype from `meta`). */
  out(id: number): TensorInfo {
    const m = this.meta;
    const rank = m[1];
    const shape = new Array<number>(rank);
    for (let i = 0; i < rank; i++) shape[i] = m[2 + i];
    const dataId: TorchDataId = { xt: id, xrc: 1 };
    return { dataId, shape, dtype: DTYPES[m[0]] };
  }

  /** TensorInfo for an addon id whose shape and dtype the caller knows. */
  outAs(id: number, shape: number[], dtype: DataType): TensorInfo {
    const dataId: TorchDataId = { xt: id, xrc: 1 };
    return { dataId, shape, dtype };
  }

  /** The addon id behind a TensorInfo owned by this backend. */
  id(t: TensorInfo): number {
    const d = t.dataId as TorchDataId;
    if (d.xt === undefined) throw new Error('torch backend: tensor data is not on the torch backend');
    return d.xt;
  }

  /** Frees tensors held under their addon ids outside TF.js (see src/backend/index.ts). */
  freeIds(ids: number[]): void {
    this.N.freeList(ids);
  }

  /**
   * Views of tensors held under addon ids (the same memory, no copy), under new ids: `begins[i]`
   * and `sizes[i]` (-1: to the end) of `ids[i]`, as Slice takes them.
   */
  sliceIds(ids: number[], begins: number[][], sizes: number[][]): number[] {
    return ids.map((id, i) => this.N.slice(id, begins[i]!, sizes[i]!));
  }

  /** TensorInfo taking over an addon id held outside TF.js, of the given shape and dtype. */
  adoptId(id: number, shape: number[], dtype: DataType): TensorInfo {
    return this.outAs(id, shape, dtype);
  }

  override write(values: BackendValues, shape: number[], dtype: DataType): object {
    const n = shape.reduce((a, b) => a * b, 1);
    const id = this.N.fromData(toTyped(values, n, dtype), shape, dtypeCode(dtype));
    const dataId: TorchDataId = { xt: id, xrc: 1 };
    return dataId;
  }

  override move(
    dataId: object,
    values: BackendValues,
    shape: number[],
    dtype: DataType,
    refCount: number,
  ): void {
    const n = shape.reduce((a, b) => a * b, 1);
    const d = dataId as TorchDataId;
    d.xt = this.N.fromData(toTyped(values, n, dtype), shape, dtypeCode(dtype));
    d.xrc = refCount;
  }

  makeTensorInfo(shape: number[], dtype: DataType, values?: BackendValues): TensorInfo {
    return { dataId: this.write(values as BackendValues, shape, dtype), shape, dtype };
  }

  override readSync(dataId: object): BackendValues {
    const d = dataId as TorchDataId;
    if (d.xt === undefined) throw new Error('torch backend: readSync of disposed or foreign data');
    return this.N.toData(d.xt);
  }

  override read(dataId: object): Promise<BackendValues> {
    return Promise.resolve(this.readSync(dataId));
  }

  override refCount(dataId: object): number {
    const d = dataId as TorchDataId;
    return d.xt === undefined ? 0 : (d.xrc ?? 0);
  }

  override incRef(dataId: object): void {
    const d = dataId as TorchDataId;
    d.xrc = (d.xrc ?? 0) + 1;
  }

  override disposeData(dataId: object, force = false): boolean {
    const d = dataId as TorchDataId;
    if (d.xt === undefined) return true;
    d.xrc = (d.xrc ?? 1) - 1;
    if (!force && d.xrc > 0) return false;
    this.N.free(d.xt);
    d.xt = undefined;
    d.xrc = 0;
    return true;
  }

  disposeIntermediateTensorInfo(t: TensorInfo): void {
    this.disposeData(t.dataId);
  }

  override numDataIds(): number {
    return this.N.count();
  }

  override memory(): { unreliable: boolean; reasons?: string[]; numBytesInTorch: number } {
    return { unreliable: false, numBytesInTorch: this.N.bytes() };
  }

  override time(f: () => void): Promise<BackendTimingInfo> {
    const start = performance.now();
    f();
    return Promise.resolve({ kernelMs: performance.now() - start });
  }

  override floatPrecision(): 16 | 32 {
    return 32;
  }

  override epsilon(): number {
    return 1e-7;
  }

  override dispose(): void {
    // tensors are freed through disposeData
  }
}
