/**
 * The thread that tokenizes a dataset (see token-cache.ts): reads the text, encodes it in pieces of
 * about `pieceChars` characters, appends each piece's tokens to a temporary token file, posts
 * `{progress, tokens}` after each piece, then writes the header and renames the file into place.
 * Pieces end after a newline that a letter follows: there every tokenizer's pre-tokenization starts a
 * new word, so the pieces' tokens, concatenated, equal the tokens of the whole text.
 */
import { closeSync, openSync, readFileSync, renameSync, rmSync, writeSync } from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { createTokenizer } from '../src/index.js';
import { encodeTokenHeader, LITTLE_ENDIAN, TOKEN_HEADER_BYTES } from './token-file.js';

/** What the thread is asked to do. */
export interface TokenizeRequest {
  textFile: string;
  tokenFile: string;
  tokenizer: string;
  pieceChars: number;
}

/** What it posts: progress after each piece, then the end. */
export type TokenizeMessage =
  | { kind: 'progress'; progress: number; tokens: number }
  | { kind: 'done'; tokens: number }
  | { kind: 'error'; message: string };

/** Where the piece that starts at `from` ends: after the first newline-then-letter past `from + size`. */
export function pieceEnd(text: string, from: number, size: number): number {
  if (from + size >= text.length) return text.length;
  const re = /\n[A-Za-z]/g;
  re.lastIndex = from + size;
  const m = re.exec(text);
  return m ? m.index + 1 : text.length;
}

function run(req: TokenizeRequest): number {
  const tokenizer = createTokenizer(req.tokenizer);
  const text = readFileSync(req.textFile, 'utf8');
  const tmp = `${req.tokenFile}.${process.pid}.${Date.now()}.tmp`;
  const fd = openSync(tmp, 'w');
  let count = 0;
  try {
    for (let at = 0; at < text.length;) {
      const end = pieceEnd(text, at, req.pieceChars);
      const ids = Int32Array.from(tokenizer.encode(text.slice(at, end)));
      const bytes = Buffer.from(ids.buffer, ids.byteOffset, ids.byteLength);
      if (!LITTLE_ENDIAN) bytes.swap32();
      writeSync(fd, bytes, 0, bytes.length, TOKEN_HEADER_BYTES + count * 4);
      count += ids.length;
      at = end;
      parentPort!.postMessage({
        kind: 'progress',
        progress: at / text.length,
        tokens: count,
      } satisfies TokenizeMessage);
    }
    writeSync(fd, encodeTokenHeader({ tokenizer: req.tokenizer, count }), 0, TOKEN_HEADER_BYTES, 0);
    closeSync(fd);
    renameSync(tmp, req.tokenFile);
    return count;
  } catch (e) {
    try {
      closeSync(fd);
    } catch {
      // already closed
    }
    rmSync(tmp, { force: true });
    throw e;
  }
}

if (parentPort && (workerData as { tokenize?: TokenizeRequest } | null)?.tokenize) {
  let msg: TokenizeMessage;
  try {
    msg = { kind: 'done', tokens: run((workerData as { tokenize: TokenizeRequest }).tokenize) };
  } catch (e) {
    msg = { kind: 'error', message: (e as Error).message };
  }
  parentPort.postMessage(msg);
}
