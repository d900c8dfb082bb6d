import * as tf from '@tensorflow/tfjs-core';

/** Dtypes a safetensors file may hold that this reader understands. */
export type SafetensorsDtype = 'F32' | 'F16' | 'BF16' | 'F64' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

const BYTES: Record<SafetensorsDtype, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

/** One raw entry of a safetensors file, decoded to a typed array. */
export interface RawTensor {
  dtype: SafetensorsDtype;
  shape: number[];
  /** float32 for float dtypes, int32 for integer dtypes, Uint8Array (0/1) for BOOL */
  data: Float32Array | Int32Array | Uint8Array;
}

export interface SafetensorsFile {
  metadata: Record<string, string>;
  tensors: Map<string, RawTensor>;
}

/** Largest header we accept (the format's own limit is 100 MB). */
const MAX_HEADER = 100 * 1024 * 1024;

/**
 * Parses a safetensors buffer. Every structural problem (short file, bad header length, invalid
 * JSON, unknown dtype, offsets out of range or overlapping, size not matching the shape) throws an
 * Error naming the entry, never returns garbage.
 */
export function parseSafetensors(buf: Uint8Array, source = 'safetensors'): SafetensorsFile {
  if (buf.byteLength < 8)
    throw new Error(`${source}: file too short (${buf.byteLength} bytes; a header needs 8)`);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  if (headerLen < 2 || headerLen > MAX_HEADER || 8 + headerLen > buf.byteLength) {
    throw new Error(`${source}: bad header length ${headerLen} (file is ${buf.byteLength} bytes)`);
  }
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(8, 8 + headerLen)));
  } catch (e) {
    throw new Error(`${source}: header is not valid UTF-8 JSON (${(e as Error).message})`, { cause: e });
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) {
    throw new Error(`${source}: header must be a JSON object`);
  }
  const dataStart = 8 + headerLen;
  const dataLen = buf.byteLength - dataStart;
  const metadata: Record<string, string> = {};
  const tensors = new Map<string, RawTensor>();
  const ranges: [number, number, string][] = [];
  for (const [name, entry] of Object.entries(header as Record<string, unknown>)) {
    if (name === '__metadata__') {
      if (typeof entry !== 'object' || entry === null)
        throw new Error(`${source}: __metadata__ must be an object`);
      for (const [k, v] of Object.entries(entry)) {
        if (typeof v !== 'string') throw new Error(`${source}: __metadata__.${k} must be a string`);
        metadata[k] = v;
      }
      continue;
    }
    const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof e !== 'object' || e === null) throw new Error(`${source}: entry "${name}" must be an object`);
    if (typeof e.dtype !== 'string' || !(e.dtype in BYTES)) {
      throw new Error(`${source}: entry "${name}" has unknown dtype ${JSON.stringify(e.dtype)}`);
    }
    const dtype = e.dtype as SafetensorsDtype;
    if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isInteger(d) && d >= 0)) {
      throw new Error(`${source}: entry "${name}" has an invalid shape ${JSON.stringify(e.shape)}`);
    }
    const shape = e.shape as number[];
    const offs = e.data_offsets;
    if (!Array.isArray(offs) || offs.length !== 2 || !offs.every((o) => Number.isInteger(o) && o >= 0)) {
      throw new Error(`${source}: entry "${name}" has invalid data_offsets ${JSON.stringify(offs)}`);
    }
    const [begin, end] = offs as [number, number];
    if (begin > end || end > dataLen) {
      throw new Error(
        `${source}: entry "${name}" data_offsets [${begin}, ${end}] out of range (data is ${dataLen} bytes)`,
      );
    }
    const count = shape.reduce((a, b) => a * b, 1);
    if (end - begin !== count * BYTES[dtype]) {
      throw new Error(
        `${source}: entry "${name}" holds ${end - begin} bytes but shape [${shape.join(', ')}] of ${dtype} needs ${count * BYTES[dtype]}`,
      );
    }
    ranges.push([begin, end, name]);
    let data: RawTensor['data'];
    try {
      data = decode(buf, dataStart + begin, count, dtype);
    } catch (err) {
      throw new Error(`${source}: entry "${name}": ${(err as Error).message}`, { cause: err });
    }
    tensors.set(name, { dtype, shape, data });
  }
  ranges.sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < ranges.length; i++) {
    if (ranges[i]![0] < ranges[i - 1]![1]) {
      throw new Error(`${source}: entries "${ranges[i - 1]![2]}" and "${ranges[i]![2]}" overlap`);
    }
  }
  return { metadata, tensors };
}

function decode(buf: Uint8Array, start: number, count: number, dtype: SafetensorsDtype): RawTensor['data'] {
  const view = new DataView(buf.buffer, buf.byteOffset + start, count * BYTES[dtype]);
  switch (dtype) {
    case 'F32': {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getFloat32(i * 4, true);
      return out;
    }
    case 'F64': {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getFloat64(i * 8, true);
      return out;
    }
    case 'F16': {
      const out = new Float32Array(count);
      for (let i = 0; i < count; i++) out[i] = halfToFloat(view.getUint16(i * 2, true));
      return out;
    }
    case 'BF16': {
      const out = new Float32Array(count);
      const f = new Float32Array(1);
      const u = new Uint32Array(f.buffer);
      for (let i = 0; i < count; i++) {
        u[0] = view.getUint16(i * 2, true) << 16;
        out[i] = f[0]!;
      }
      return out;
    }
    case 'I64': {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) {
        const v = view.getBigInt64(i * 8, true);
        if (v > 2147483647n || v < -2147483648n) throw new Error(`I64 value ${v} does not fit in int32`);
        out[i] = Number(v);
      }
      return out;
    }
    case 'I32': {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getInt32(i * 4, true);
      return out;
    }
    case 'I16': {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getInt16(i * 2, true);
      return out;
    }
    case 'I8': {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getInt8(i);
      return out;
    }
    case 'U8': {
      const out = new Int32Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getUint8(i);
      return out;
    }
    case 'BOOL': {
      const out = new Uint8Array(count);
      for (let i = 0; i < count; i++) out[i] = view.getUint8(i) ? 1 : 0;
      return out;
    }
  }
}

function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

/** Converts a raw entry to a tf.Tensor: float32, int32 or bool. */
export function rawToTensor(raw: RawTensor): tf.Tensor {
  if (raw.dtype === 'BOOL') return tf.tensor(raw.data, raw.shape, 'bool');
  if (raw.data instanceof Int32Array) return tf.tensor(raw.data, raw.shape, 'int32');
  return tf.tensor(raw.data, raw.shape, 'float32');
}

/** Reads a safetensors buffer into tf tensors (the caller owns and disposes them). */
export function loadSafetensors(
  buf: Uint8Array,
  source?: string,
): { metadata: Record<string, string>; tensors: Record<string, tf.Tensor> } {
  const file = parseSafetensors(buf, source);
  // own properties whatever the names (an entry called "__proto__" must not become a prototype)
  const tensors: Record<string, tf.Tensor> = Object.fromEntries(
    [...file.tensors].map(([name, raw]) => [name, rawToTensor(raw)]),
  );
  return { metadata: file.metadata, tensors };
}

/**
 * Serialises tensors to safetensors: float32 as F32, int32 as I32, bool as BOOL. Entries are
 * written in sorted name order, 8-byte aligned header as the format recommends.
 */
export function saveSafetensors(
  tensors: Record<string, tf.Tensor>,
  metadata: Record<string, string> = {},
): Uint8Array {
  const names = Object.keys(tensors).sort();
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  const chunks: Uint8Array[] = [];
  let offset = 0;
  for (const name of names) {
    const t = tensors[name]!;
    let bytes: Uint8Array;
    let dtype: SafetensorsDtype;
    if (t.dtype === 'float32') {
      const d = t.dataSync() as Float32Array;
      bytes = new Uint8Array(d.buffer.slice(d.byteOffset, d.byteOffset + d.byteLength));
      dtype = 'F32';
    } else if (t.dtype === 'int32') {
      const d = t.dataSync() as Int32Array;
      bytes = new Uint8Array(d.buffer.slice(d.byteOffset, d.byteOffset + d.byteLength));
      dtype = 'I32';
    } else if (t.dtype === 'bool') {
      bytes = Uint8Array.from(t.dataSync() as Uint8Array, (v) => (v ? 1 : 0));
      dtype = 'BOOL';
    } else {
      throw new Error(
        `saveSafetensors: tensor "${name}" has dtype ${t.dtype}; expected float32, int32 or bool`,
      );
    }
    header[name] = { dtype, shape: t.shape, data_offsets: [offset, offset + bytes.byteLength] };
    chunks.push(bytes);
    offset += bytes.byteLength;
  }
  let json = JSON.stringify(header);
  const pad = (8 - ((8 + Buffer.byteLength(json)) % 8)) % 8;
  json += ' '.repeat(pad);
  const headerBytes = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + headerBytes.byteLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.byteLength), true);
  out.set(headerBytes, 8);
  let pos = 8 + headerBytes.byteLength;
  for (const c of chunks) {
    out.set(c, pos);
    pos += c.byteLength;
  }
  return out;
}
