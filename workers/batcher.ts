import { BatchDecoder, type BatchSequenceOptions, type BatchToken } from '../src/index.js';
import type { DecodeStep } from './metrics.js';
import type { LoadedModel } from './model-cache.js';

/** How a batched generation ended: its own end (eos, length), stopped by its handler, or aborted. */
export type BatchEnd = 'eos' | 'length' | 'stopped' | 'aborted';

/** One generation handed to a batcher. */
export interface BatchRequest {
  prompt: number[];
  options: BatchSequenceOptions;
  /** called with each token, in order; returning true ends the generation (a stop string) */
  onToken(t: BatchToken): boolean;
  /** aborting removes the generation before the next step */
  signal?: AbortSignal;
}

/**
 * The decode loop of one loaded model: every active generation of that model advances together,
 * one forward pass per step (the library's BatchDecoder). A generation joins at the next step and
 * leaves on its end of sequence, its maxTokens, a stop string (its handler says so), or an abort
 * (cancel or client disconnect). Between steps the loop yields to the event loop, so new requests,
 * cancels and Redis traffic are served while it runs; it stops when no generation is left.
 */
export class GenerationBatcher {
  private readonly decoder: BatchDecoder;
  private readonly pending = new Map<
    number,
    { req: BatchRequest; done: (end: BatchEnd) => void; fail: (e: unknown) => void }
  >();
  /** generations waiting for a place in a full batch, in arrival order */
  private readonly waiting: {
    req: BatchRequest;
    start: () => void;
    abort: () => void;
    fail: (e: unknown) => void;
  }[] = [];
  private running = false;

  constructor(
    readonly model: LoadedModel,
    readonly maxBatch: number,
    /** called when the last generation has left (the owner may drop the batcher) */
    private readonly onIdle: () => void = () => undefined,
    /** called after each step with what it did and how long it and the wait before it took */
    private readonly onStep: (s: DecodeStep) => void = () => undefined,
  ) {
    this.decoder = new BatchDecoder(model.ar, { maxBatch });
  }

  /** Generations held now: in the batch, or waiting for a place in it. */
  get size(): number {
    return this.decoder.size + this.waiting.length;
  }

  /** Whether a model can be decoded in batches; else the reason (it is then served one request at a time). */
  static unsupported(model: LoadedModel): string | null {
    return BatchDecoder.unsupported(model.ar);
  }

  /**
   * Runs one generation to its end; resolves with how it ended. When the batch is full (maxBatch),
   * the generation waits for the next place, in arrival order (an abort while it waits ends it).
   */
  run(req: BatchRequest): Promise<BatchEnd> {
    if (req.signal?.aborted) {
      if (this.size === 0 && !this.running) this.onIdle();
      return Promise.resolve('aborted');
    }
    if (this.decoder.size < this.decoder.maxBatch) return this.start(req);
    return new Promise<BatchEnd>((resolve, reject) => {
      const entry = {
        req,
        start: () => {
          req.signal?.removeEventListener('abort', entry.abort);
          try {
            this.start(req).then(resolve, reject);
          } catch (e) {
            reject(e instanceof Error ? e : new Error(String(e)));
          }
        },
        abort: () => {
          const at = this.waiting.indexOf(entry);
          if (at >= 0) this.waiting.splice(at, 1);
          req.signal?.removeEventListener('abort', entry.abort);
          resolve('aborted');
        },
        fail: (e: unknown) => {
          req.signal?.removeEventListener('abort', entry.abort);
          reject(e instanceof Error ? e : new Error(String(e)));
        },
      };
      req.signal?.addEventListener('abort', entry.abort, { once: true });
      this.waiting.push(entry);
    });
  }

  /** Moves waiting generations into the batch while it has room. */
  private admit(): void {
    while (this.waiting.length && this.decoder.size < this.decoder.maxBatch) this.waiting.shift()!.start();
  }

  /** Adds a generation to the batch (which has room) and runs it to its end. */
  private start(req: BatchRequest): Promise<BatchEnd> {
    const id = this.decoder.add(req.prompt, req.options);
    return new Promise<BatchEnd>((resolve, reject) => {
      const onAbort = () => this.finish(id, 'aborted');
      req.signal?.addEventListener('abort', onAbort, { once: true });
      const detach = () => req.signal?.removeEventListener('abort', onAbort);
      this.pending.set(id, {
        req,
        done: (end) => {
          detach();
          resolve(end);
        },
        fail: (e) => {
          detach();
          reject(e instanceof Error ? e : new Error(String(e)));
        },
      });
      this.kick();
    });
  }

  /**
   * Starts the decode loop, where it is not running, at the event loop's next check phase rather than
   * at once: the generations that arrive in this turn (requests taken together) join its first step,
   * and the replies to what their jobs sent meanwhile (a cancel check, the model's record) are read
   * before its second step, not after it.
   */
  private kick(): void {
    if (this.running) return;
    this.running = true;
    setImmediate(() => void this.loop());
  }

  private finish(id: number, end: BatchEnd): void {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    this.decoder.remove(id);
    p.done(end);
    this.admit();
  }

  /**
   * Hands out a step's tokens to their generations, in order; those that end (their own end, or
   * their handler's stop) leave the batch.
   */
  private handOut(tokens: BatchToken[]): void {
    for (const t of tokens) {
      const p = this.pending.get(t.id);
      if (!p) continue;
      let stop: boolean;
      try {
        stop = p.req.onToken(t);
      } catch {
        stop = true;
      }
      if (t.done) this.finish(t.id, t.done);
      else if (stop) this.finish(t.id, 'stopped');
    }
  }

  /** Fails every generation held (in the batch and waiting for a place) with a step's error. */
  private failAll(e: unknown): void {
    for (const [id, p] of [...this.pending]) {
      this.pending.delete(id);
      this.decoder.remove(id);
      p.fail(e);
    }
    for (const w of this.waiting.splice(0)) w.fail(e);
  }

  /**
   * The decode loop. Generations that join a running batch are prefilled first and get their first
   * token at once; the loop then yields one turn, in which those tokens are written and the replies
   * that other joining generations wait for are read, and runs the batched step with them in it. A
   * step of the batch alone yields after it.
   */
  private async loop(): Promise<void> {
    const now = () => performance.now();
    const turn = () => new Promise<void>((r) => setImmediate(r));
    // when the previous step's tokens were handed out (null before the loop's first step)
    let handed: number | null = null;
    try {
      while (this.decoder.size > 0) {
        let idle = 0;
        let compute = 0;
        let firsts: BatchToken[] = [];
        const cycleStart = now();
        if (handed !== null) idle += cycleStart - handed;
        if (this.decoder.queued > 0 && this.decoder.queued < this.decoder.size) {
          try {
            firsts = this.decoder.prefillQueued();
          } catch (e) {
            this.failAll(e);
            break;
          }
          const prefilled = now();
          compute += prefilled - cycleStart;
          this.handOut(firsts);
          const out = now();
          await turn();
          idle += now() - out;
          if (this.decoder.size === 0) {
            this.record(firsts, compute, handed === null ? null : idle);
            handed = now();
            continue;
          }
        }
        let tokens: BatchToken[];
        const started = now();
        try {
          tokens = this.decoder.step();
        } catch (e) {
          // a failed step fails every generation in it, and those waiting for a place
          this.failAll(e);
          break;
        }
        compute += now() - started;
        this.record(firsts.length ? [...firsts, ...tokens] : tokens, compute, handed === null ? null : idle);
        this.handOut(tokens);
        handed = now();
        await turn();
      }
    } finally {
      this.running = false;
      if (this.size === 0) this.onIdle();
    }
  }

  /** Reports a step (a joining generation's prefill before it included) to onStep. */
  private record(tokens: BatchToken[], computeMs: number, idleMs: number | null): void {
    let prefills = 0;
    for (const t of tokens) if (t.index === 0) prefills++;
    try {
      this.onStep({
        rows: tokens.length,
        prefills,
        seconds: computeMs / 1000,
        betweenSeconds: idleMs === null ? null : idleMs / 1000,
      });
    } catch {
      // a recorder's failure is no generation's
    }
  }

  /** Frees the decoder; generations still held end as aborted. */
  dispose(): void {
    for (const w of this.waiting.splice(0)) w.abort();
    for (const id of [...this.pending.keys()]) this.finish(id, 'aborted');
    this.decoder.dispose();
  }
}

/**
 * The batcher of a loaded model (created on first use, dropped when its last generation leaves), or
 * null when the model cannot be decoded in batches, or when a batcher of an earlier load of the same
 * weights still runs. A full batcher is returned too: its new generations wait for a place.
 */
export function batcherFor(
  batchers: Map<string, GenerationBatcher>,
  model: LoadedModel,
  maxBatch: number,
  onStep?: (s: DecodeStep) => void,
): GenerationBatcher | null {
  let b = batchers.get(model.key);
  // a batcher left over from an earlier load of the same weights (evicted and loaded again)
  if (b && b.model !== model && b.size === 0) {
    batchers.delete(model.key);
    b.dispose();
    b = undefined;
  }
  if (!b) {
    if (GenerationBatcher.unsupported(model)) return null;
    const created: GenerationBatcher = new GenerationBatcher(
      model,
      maxBatch,
      () => {
        if (batchers.get(model.key) === created) batchers.delete(model.key);
        created.dispose();
      },
      onStep,
    );
    batchers.set(model.key, created);
    b = created;
  }
  return b.model === model ? b : null;
}
