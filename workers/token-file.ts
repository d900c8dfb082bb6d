/**
 * A dataset's tokens under one tokenizer, cached in DATA_DIR beside its text
 * (`datasets/<id>.<tokenizer>.tokens`). Layout, little-endian:
 *   bytes 0-7    magic "XTTOKEN1"
 *   bytes 8-15   token count (u64)
 *   bytes 16-47  tokenizer name (ASCII, NUL-padded)
 *   bytes 48-63  zero
 *   bytes 64-    the tokens, one Int32 each
 * The count is written last, so a file cut short by a crash never passes `readTokenHeader`.
 */
import { open } from 'node:fs/promises';

export const TOKEN_FILE_MAGIC = 'XTTOKEN1';
export const TOKEN_HEADER_BYTES = 64;
const NAME_AT = 16;
const NAME_BYTES = 32;

/** The header of a token file. */
export interface TokenFileHeader {
  tokenizer: string;
  count: number;
}

/** Encodes a header (`tokenizer` at most 32 ASCII characters). */
export function encodeTokenHeader(h: TokenFileHeader): Buffer {
  if (!/^[\x21-\x7e]{1,32}$/.test(h.tokenizer))
    throw new Error(
      `tokenizer: expected 1 to 32 printable ASCII characters, got ${JSON.stringify(h.tokenizer)}`,
    );
  if (!Number.isSafeInteger(h.count) || h.count < 0)
    throw new Error(`count: expected a non-negative integer, got ${h.count}`);
  const b = Buffer.alloc(TOKEN_HEADER_BYTES);
  b.write(TOKEN_FILE_MAGIC, 0, 'ascii');
  b.writeBigUInt64LE(BigInt(h.count), 8);
  b.write(h.tokenizer, NAME_AT, 'ascii');
  return b;
}

/**
 * Reads and checks a token file's header: the magic, and a size that holds exactly `count` tokens.
 * Throws an Error naming the file and what is wrong.
 */
export async function readTokenHeader(file: string): Promise<TokenFileHeader> {
  const fh = await open(file, 'r');
  try {
    return await headerOf(fh, file);
  } finally {
    await fh.close();
  }
}

async function headerOf(fh: Awaited<ReturnType<typeof open>>, file: string): Promise<TokenFileHeader> {
  const b = Buffer.alloc(TOKEN_HEADER_BYTES);
  const { bytesRead } = await fh.read(b, 0, TOKEN_HEADER_BYTES, 0);
  const magic = b.toString('ascii', 0, 8);
  if (bytesRead < TOKEN_HEADER_BYTES || magic !== TOKEN_FILE_MAGIC)
    throw new Error(
      `${file}: expected a token file starting with ${TOKEN_FILE_MAGIC}, got ${JSON.stringify(magic)}`,
    );
  const count = Number(b.readBigUInt64LE(8));
  const tokenizer = b.toString('ascii', NAME_AT, NAME_AT + NAME_BYTES).replace(/\0+$/, '');
  const { size } = await fh.stat();
  const want = TOKEN_HEADER_BYTES + count * 4;
  if (size !== want) throw new Error(`${file}: expected ${want} bytes for ${count} tokens, got ${size}`);
  return { tokenizer, count };
}

/**
 * Loads a token file's tokens with positioned reads of `sliceBytes` each, straight into the
 * Int32Array's memory (no intermediate copy). Checks the header first, and that it names
 * `tokenizer` when given.
 */
export async function readTokenFile(
  file: string,
  tokenizer?: string,
  sliceBytes = 16 << 20,
): Promise<{ header: TokenFileHeader; tokens: Int32Array }> {
  const fh = await open(file, 'r');
  try {
    const header = await headerOf(fh, file);
    if (tokenizer !== undefined && header.tokenizer !== tokenizer)
      throw new Error(`${file}: expected tokens of tokenizer ${tokenizer}, got ${header.tokenizer}`);
    const tokens = new Int32Array(header.count);
    const bytes = new Uint8Array(tokens.buffer);
    for (let at = 0; at < bytes.length;) {
      const n = Math.min(sliceBytes, bytes.length - at);
      const { bytesRead } = await fh.read(bytes, at, n, TOKEN_HEADER_BYTES + at);
      if (bytesRead === 0) throw new Error(`${file}: ended at byte ${TOKEN_HEADER_BYTES + at}`);
      at += bytesRead;
    }
    if (!LITTLE_ENDIAN) Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).swap32();
    return { header, tokens };
  } finally {
    await fh.close();
  }
}

/** Whether this host stores an Int32Array little-endian (the file's order). */
export const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
