import { stat } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';
import type { Storage } from '../models/storage.js';
import type { TokenizerName } from '../models/schemas.js';
import { readTokenFile, readTokenHeader } from './token-file.js';
import type { TokenizeMessage, TokenizeRequest } from './tokenize-thread.js';

// the thread runs TypeScript: tsx's loader is registered inside it before its module loads
const BOOT = `
const { workerData } = require('node:worker_threads');
import('tsx/esm/api').then((tsx) => { tsx.register(); return import(workerData.entry); });
`;

/** How a dataset's tokens were had. */
export interface CachedTokens {
  tokens: Int32Array;
  /** Whether they came from the token file (false: the text was tokenized now). */
  cached: boolean;
  /** Milliseconds spent reading the token file. */
  loadMs: number;
  /** Milliseconds spent tokenizing (0 when cached). */
  tokenizeMs: number;
}

/** Progress of a tokenization: the fraction of the text done and the tokens so far. */
export type TokenizeProgress = (p: { progress: number; tokens: number }) => void;

/**
 * A dataset's tokens per tokenizer, tokenized once and kept in DATA_DIR as a token file
 * (token-file.ts). Tokenizing runs on a worker thread, never on this event loop; requests for the
 * same (dataset, tokenizer) while it runs share it. A dataset's text never changes (an upload is a
 * new dataset), so a complete token file stays valid until the dataset is deleted.
 */
export class TokenCache {
  /** Tokenizations run by this process (a cached load does not count). */
  tokenizeRuns = 0;
  private inflight = new Map<string, { promise: Promise<void>; listeners: Set<TokenizeProgress> }>();

  constructor(
    private readonly storage: Storage,
    /** Characters per piece the thread encodes between progress reports. */
    private readonly pieceChars = 1 << 20,
  ) {}

  /** The tokens of `datasetId` under `tokenizer`, tokenizing the text first when no token file has them. */
  async tokens(
    datasetId: string,
    tokenizer: TokenizerName,
    onProgress?: TokenizeProgress,
  ): Promise<CachedTokens> {
    const file = this.storage.abs(this.storage.tokensFile(datasetId, tokenizer));
    const cached = await isComplete(file, tokenizer);
    let tokenizeMs = 0;
    if (!cached) {
      const t0 = performance.now();
      await this.tokenize(datasetId, tokenizer, file, onProgress);
      tokenizeMs = performance.now() - t0;
    }
    const t1 = performance.now();
    const { tokens } = await readTokenFile(file, tokenizer);
    return { tokens, cached, loadMs: performance.now() - t1, tokenizeMs };
  }

  private tokenize(
    datasetId: string,
    tokenizer: TokenizerName,
    tokenFile: string,
    onProgress?: TokenizeProgress,
  ): Promise<void> {
    let run = this.inflight.get(tokenFile);
    if (!run) {
      const listeners = new Set<TokenizeProgress>();
      const request: TokenizeRequest = {
        textFile: this.storage.abs(this.storage.datasetFile(datasetId)),
        tokenFile,
        tokenizer,
        pieceChars: this.pieceChars,
      };
      this.tokenizeRuns++;
      const promise = runThread(request, (p) => listeners.forEach((l) => l(p))).finally(() =>
        this.inflight.delete(tokenFile),
      );
      run = { promise, listeners };
      this.inflight.set(tokenFile, run);
    }
    if (onProgress) run.listeners.add(onProgress);
    return run.promise;
  }
}

async function isComplete(file: string, tokenizer: string): Promise<boolean> {
  if (!(await stat(file).catch(() => null))) return false;
  // a file of another layout or a cut one is tokenized again (and replaced)
  return readTokenHeader(file).then(
    (h) => h.tokenizer === tokenizer,
    () => false,
  );
}

function runThread(request: TokenizeRequest, onProgress: TokenizeProgress): Promise<void> {
  const entry = new URL('./tokenize-thread.ts', import.meta.url).href;
  const worker = new Worker(BOOT, { eval: true, workerData: { entry, tokenize: request } });
  return new Promise<void>((resolve, reject) => {
    let settled = false;
    const settle = (e?: Error) => {
      if (settled) return;
      settled = true;
      void worker.terminate();
      if (e) reject(e);
      else resolve();
    };
    worker.on('message', (m: TokenizeMessage) => {
      if (m.kind === 'progress') onProgress({ progress: m.progress, tokens: m.tokens });
      else if (m.kind === 'done') settle();
      else settle(new Error(`tokenizing ${request.textFile}: ${m.message}`));
    });
    worker.on('error', (e) => settle(e));
    worker.on('exit', (code) => settle(new Error(`the tokenizing thread exited (code ${code})`)));
  });
}
