import * as tf from '@tensorflow/tfjs-core';
import { UnrecoverableError, type Job } from 'bullmq';
import type { GenerateOptions } from './engine.js';
import { JobRun, type WorkerContext } from './context.js';
import type { GenerateJobData } from './queues.js';
import type { ModelRecord } from '../models/schemas.js';
import { ModelCache, type LoadedModel } from './model-cache.js';
import { batcherFor } from './batcher.js';
import { recordDecodeStep } from './metrics.js';

export interface GenerateJobResult {
  tokens: number[];
  text: string;
  tokensPerSecond: number;
  timeToFirstTokenMs: number;
  finishReason: 'length' | 'stop' | 'eos';
  [k: string]: unknown;
}

/**
 * Text decoded so far, emitted in pieces: a piece is held back while it ends in an incomplete
 * multi-byte character (decoded as U+FFFD), so the concatenated pieces equal the final text. Only
 * the tokens after the last emitted piece are decoded (that piece ended on a character boundary).
 */
export class IncrementalText {
  private emitted = '';
  /** how many tokens the emitted text covers */
  private covered = 0;
  constructor(private readonly decode: (ids: number[]) => string) {}
  push(ids: number[]): string {
    const piece = this.decode(ids.slice(this.covered));
    if (piece.endsWith('\uFFFD')) return '';
    this.emitted += piece;
    this.covered = ids.length;
    return piece;
  }
  get text(): string {
    return this.emitted;
  }
}

/** Filter options the library's generateStream takes for topK / topP / minP. */
function filterOptions(
  d: GenerateJobData,
  numTokens: number,
): Pick<GenerateOptions, 'filterLogitsFn' | 'filterKwargs'> {
  if (d.minP !== undefined) return { filterLogitsFn: 'minP', filterKwargs: { minP: d.minP } };
  if (d.topP !== undefined) return { filterLogitsFn: 'topP', filterKwargs: { thres: d.topP } };
  if (d.topK !== undefined)
    return { filterLogitsFn: 'topK', filterKwargs: { k: Math.min(d.topK, numTokens) } };
  return {};
}

/**
 * A generation's tokens as they come: text pieces, end of sequence, stop strings, and one `token`
 * event ({index, tokenId, text}) per token in the job's Redis Stream, appended in order.
 */
class TokenSink {
  readonly tokens: number[] = [];
  finishReason: GenerateJobResult['finishReason'] = 'length';
  firstAt = 0;
  private readonly text: IncrementalText;
  private appends: Promise<unknown> = Promise.resolve();
  /** the write the last token event went out with */
  private lastWrite: Promise<unknown> | null = null;

  /** token events held back (see `held`), in order */
  private heldEvents: Record<string, unknown>[] | null;

  /**
   * Whether token events may wait for the next steps' and go out with them (TOKEN_WRITE_STEPS; a
   * batch's decode loop does not wait for them); the first token never waits.
   */
  coalesce = true;

  constructor(
    private readonly ctx: WorkerContext,
    private readonly d: GenerateJobData,
    private readonly tokenizer: LoadedModel['tokenizer'],
    /** hold the token events back until `release` (the job's checks have not answered yet) */
    held = false,
  ) {
    this.text = new IncrementalText((ids) => tokenizer.decode(ids));
    this.heldEvents = held ? [] : null;
  }

  /** Sends the events held back so far, in order, and every later one as it comes. */
  release(): void {
    const events = this.heldEvents;
    this.heldEvents = null;
    for (const e of events ?? []) this.emit(e);
  }

  private emit(event: Record<string, unknown>): void {
    if (this.heldEvents) {
      this.heldEvents.push(event);
      return;
    }
    // the tokens of one decoding step (or of the writer's few steps), of every generation in it, go
    // out in one write; a generation's first token at once (its time to first token)
    const { written } = this.ctx.events.append(
      this.d.jobId,
      'token',
      event,
      !this.coalesce || event.index === 0,
    );
    if (written !== this.lastWrite) {
      this.lastWrite = written;
      const before = this.appends;
      this.appends = before.then(() => written);
    }
  }

  /** Takes the next token; returns true when the generation ends here (end of sequence, a stop string, maxTokens). */
  push(tokenId: number): boolean {
    const d = this.d;
    if (!this.firstAt) this.firstAt = Date.now();
    if (this.tokenizer.eosTokenId !== undefined && tokenId === this.tokenizer.eosTokenId) {
      this.finishReason = 'eos';
      return true;
    }
    this.tokens.push(tokenId);
    let piece = this.text.push(this.tokens);
    let stopHit = false;
    if (d.stop?.length) {
      const full = this.text.text;
      for (const s of d.stop) {
        const at = full.indexOf(s, Math.max(0, full.length - piece.length - s.length + 1));
        if (at >= 0) {
          piece = piece.slice(0, Math.max(0, piece.length - (full.length - at)));
          stopHit = true;
          break;
        }
      }
    }
    this.emit({ index: this.tokens.length - 1, tokenId, text: piece });
    if (stopHit) this.finishReason = 'stop';
    return stopHit || this.tokens.length >= d.maxTokens;
  }

  /** Resolves when every token event is in the stream. */
  flush(): Promise<unknown> {
    return this.appends;
  }

  /** The final text (cut at the first stop string). */
  finalText(): string {
    let finalText = this.text.text || this.tokenizer.decode(this.tokens);
    const stop = this.d.stop;
    if (this.finishReason === 'stop' && stop) {
      const cut = Math.min(...stop.map((s) => finalText.indexOf(s)).filter((i) => i >= 0));
      if (Number.isFinite(cut)) finalText = finalText.slice(0, cut);
    }
    return finalText;
  }
}

/** Samples the job's tokens into `sink`: in the model's batch when it can, else alone. */
async function sample(
  ctx: WorkerContext,
  d: GenerateJobData,
  loaded: LoadedModel,
  sink: TokenSink,
  signal: AbortSignal,
): Promise<void> {
  const { ar, built } = loaded;
  // past maxSeqLen the window slides, which a cache of absolute positions cannot follow
  const cacheKv =
    d.cacheKv ??
    (d.promptTokens.length + d.maxTokens <= built.maxSeqLen || built.model.canCacheKvOutsideMaxSeqLen);
  const sampling = { temperature: d.temperature ?? 1, seed: d.seed, ...filterOptions(d, built.numTokens) };
  // a batch runs at float32: other precisions decode alone
  const batchable = cacheKv && (d.precision ?? 'fp32') === 'fp32';
  const batcher = batchable
    ? batcherFor(
        ctx.batchers,
        loaded,
        ctx.maxBatch,
        ctx.metrics ? (s) => recordDecodeStep(ctx.metrics!.decode, s) : undefined,
      )
    : null;
  if (batcher) {
    // the last tokens' write is not waited for here: the job's end goes out with it (or right after)
    await batcher.run({
      prompt: d.promptTokens,
      options: { maxTokens: d.maxTokens, ...sampling },
      onToken: (t) => sink.push(t.token),
      signal,
    });
    return;
  }
  const prompt = tf.tensor2d([d.promptTokens], [1, d.promptTokens.length], 'int32');
  // each token's write is waited for below: none waits for the next steps'
  sink.coalesce = false;
  try {
    const opts: GenerateOptions = { ...sampling, cacheKv, precision: d.precision, signal };
    for await (const step of ar.generateStream(prompt, d.maxTokens, opts)) {
      const end = sink.push(step.tokens[0]!);
      await sink.flush();
      if (end || signal.aborted) break;
    }
  } finally {
    prompt.dispose();
  }
}

/** A generation under way: the weights it samples from (pinned), its tokens' sink, its sampling. */
interface Started {
  loaded: LoadedModel;
  sink: TokenSink;
  sampling: Promise<void>;
}

/**
 * Starts a generation on the newest weights of its model loaded in this worker before its checks
 * (`checked`: a cancel requested, the model's record) answer, its token events held back until
 * they do. Returns it once the checks agree: no cancel, the model still there with these weights.
 * Returns null when no weights of the model are loaded, or when a check disagrees or fails: the
 * sampling is then stopped with nothing sent and the weights released.
 */
async function startEarly(
  ctx: WorkerContext,
  d: GenerateJobData,
  signal: AbortSignal,
  checked: Promise<[boolean, ModelRecord | null]>,
  begin: () => void,
): Promise<Started | null> {
  const loaded = ctx.cache.acquireLatest(d.modelId);
  if (!loaded) return null;
  begin();
  const early = new AbortController();
  const sink = new TokenSink(ctx, d, loaded.tokenizer, true);
  const sampling = sample(ctx, d, loaded, sink, AbortSignal.any([signal, early.signal]));
  sampling.catch(() => undefined); // seen by the caller, or dropped with the run
  const agreed = await checked.then(
    ([cancel, model]) => !cancel && model !== null && ModelCache.keyOf(model) === loaded.key,
    () => false,
  );
  if (agreed) {
    sink.release();
    return { loaded, sink, sampling };
  }
  early.abort();
  await sampling.catch(() => undefined);
  ctx.cache.release(loaded);
  return null;
}

/**
 * Runs one generation: streams `token` events ({index, tokenId, text}) into the job's Redis Stream as
 * tokens are sampled, then `done`. A cancel request (the client went away) stops it at the next token.
 * Generations of one model run together in its batcher (see GenerationBatcher); models the batched
 * path cannot decode, and generations without a KV cache, run alone. On a model loaded here a
 * generation starts before its checks answer (see startEarly).
 */
export async function processGenerate(
  ctx: WorkerContext,
  job: Job<GenerateJobData>,
  bullSignal?: AbortSignal,
): Promise<GenerateJobResult | { cancelled: true }> {
  const d = job.data;
  // job.timestamp is the queueing process's clock: across machines, as good as their clocks agree
  if (ctx.metrics && job.timestamp)
    ctx.metrics.generateQueueWait.observe(Math.max(0, Date.now() - job.timestamp) / 1000);
  const run = new JobRun(ctx, 'generate', d.jobId, bullSignal);
  let started: Started | null = null;
  const endPriority = ctx.priority.begin();
  // marked active while it samples (written before any token event, on the same connection)
  let begun: Promise<unknown> | null = null;
  const begin = () =>
    (begun ??= run.begin().then(
      () => null,
      (e: unknown) => e,
    ));
  try {
    // a generation joins its batch in as few round trips as it can (each waits for a decoding step)
    const checked = Promise.all([run.cancelRequested(), ctx.registry.getModel(d.modelId)]);
    const t0 = Date.now();
    started = await startEarly(ctx, d, run.signal, checked, begin);
    if (!started) {
      const [cancel, model] = await checked;
      if (cancel) return await run.cancelled({ tokens: 0 });
      if (!model) throw new UnrecoverableError(`model ${d.modelId} no longer exists`);
      begin();
      const loaded = await ctx.cache.acquire(model);
      const sink = new TokenSink(ctx, d, loaded.tokenizer);
      started = { loaded, sink, sampling: sample(ctx, d, loaded, sink, run.signal) };
    }
    const { sink } = started;
    try {
      await started.sampling;
    } catch (e) {
      await sink.flush().catch(() => undefined);
      throw e;
    }
    const notBegun = await begun;
    if (notBegun) throw notBegun;
    const tokens = sink.tokens;
    const seconds = Math.max(1e-6, (Date.now() - t0) / 1000);
    // the end (completed, or cancelled when a cancel was requested meanwhile) is written with the
    // last tokens, on the same connection after them: one round trip from the last token to the end
    const ended = run.completedUnlessCancelled<GenerateJobResult>(
      {
        tokens,
        text: sink.finalText(),
        tokensPerSecond: tokens.length / seconds,
        timeToFirstTokenMs: sink.firstAt ? sink.firstAt - t0 : 0,
        finishReason: sink.finishReason,
      },
      { tokens: tokens.length },
    );
    const [, result] = await Promise.all([sink.flush(), ended]);
    return result;
  } catch (e) {
    throw await run.failed('generation', e);
  } finally {
    run.close();
    endPriority();
    if (started) ctx.cache.release(started.loaded);
  }
}
