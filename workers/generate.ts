import * as tf from '@tensorflow/tfjs-core';
import { UnrecoverableError, type Job } from 'bullmq';
import type { GenerateOptions } from './engine.js';
import { recordFailure, type WorkerContext } from './context.js';
import type { GenerateJobData } from './queues.js';

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
 * multi-byte character (decoded as U+FFFD), so the concatenated pieces equal the final text.
 */
class IncrementalText {
  private emitted = '';
  constructor(private readonly decode: (ids: number[]) => string) {}
  push(ids: number[]): string {
    const full = this.decode(ids);
    if (full.endsWith('\uFFFD') || !full.startsWith(this.emitted)) return '';
    const piece = full.slice(this.emitted.length);
    this.emitted = full;
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
 * Runs one generation: streams `token` events ({index, tokenId, text}) into the job's Redis Stream as
 * tokens are sampled, then `done`. A cancel request (the client went away) stops it at the next token.
 */
export async function processGenerate(
  ctx: WorkerContext,
  job: Job<GenerateJobData>,
  bullSignal?: AbortSignal,
): Promise<GenerateJobResult | { cancelled: true }> {
  const d = job.data;
  const { registry } = ctx;
  const started = Date.now();
  const ac = new AbortController();
  ctx.running.set(d.jobId, ac);
  bullSignal?.addEventListener('abort', () => ac.abort());
  const observe = (state: string) =>
    ctx.metrics?.jobDuration.observe({ type: 'generate', state }, (Date.now() - started) / 1000);
  let loaded: Awaited<ReturnType<typeof ctx.cache.acquire>> | null = null;
  const endPriority = ctx.priority.begin();
  const tokens: number[] = [];
  try {
    if (await registry.isCancelRequested(d.jobId)) {
      await registry.updateJob(d.jobId, { state: 'cancelled' });
      await registry.appendEvent(d.jobId, 'cancelled', { tokens: 0 });
      return { cancelled: true };
    }
    const model = await registry.getModel(d.modelId);
    if (!model) throw new UnrecoverableError(`model ${d.modelId} no longer exists`);
    await registry.updateJob(d.jobId, { state: 'active' });
    loaded = await ctx.cache.acquire(model);
    const { ar, tokenizer, built } = loaded;
    const text = new IncrementalText((ids) => tokenizer.decode(ids));
    const prompt = tf.tensor2d([d.promptTokens], [1, d.promptTokens.length], 'int32');
    let firstAt = 0;
    let finishReason: GenerateJobResult['finishReason'] = 'length';
    const t0 = Date.now();
    try {
      const opts: GenerateOptions = {
        temperature: d.temperature ?? 1,
        // past maxSeqLen the window slides, which a cache of absolute positions cannot follow
        cacheKv: d.cacheKv ?? d.promptTokens.length + d.maxTokens <= built.maxSeqLen,
        seed: d.seed,
        precision: d.precision,
        signal: ac.signal,
        ...filterOptions(d, built.numTokens),
      };
      for await (const step of ar.generateStream(prompt, d.maxTokens, opts)) {
        const tokenId = step.tokens[0]!;
        if (!firstAt) firstAt = Date.now();
        if (tokenizer.eosTokenId !== undefined && tokenId === tokenizer.eosTokenId) {
          finishReason = 'eos';
          break;
        }
        tokens.push(tokenId);
        let piece = text.push(tokens);
        let stopHit = false;
        if (d.stop?.length) {
          const full = text.text;
          for (const s of d.stop) {
            const at = full.indexOf(s, Math.max(0, full.length - piece.length - s.length + 1));
            if (at >= 0) {
              piece = piece.slice(0, Math.max(0, piece.length - (full.length - at)));
              stopHit = true;
              break;
            }
          }
        }
        await registry.appendEvent(d.jobId, 'token', { index: tokens.length - 1, tokenId, text: piece });
        if (stopHit) {
          finishReason = 'stop';
          break;
        }
        if (ac.signal.aborted) break;
        if (tokens.length >= d.maxTokens) break;
      }
    } finally {
      prompt.dispose();
    }
    if (ac.signal.aborted || (await registry.isCancelRequested(d.jobId))) {
      await registry.updateJob(d.jobId, { state: 'cancelled', progress: { tokens: tokens.length } });
      await registry.appendEvent(d.jobId, 'cancelled', { tokens: tokens.length });
      observe('cancelled');
      return { cancelled: true };
    }
    let finalText = text.text || tokenizer.decode(tokens);
    if (finishReason === 'stop' && d.stop) {
      const cut = Math.min(...d.stop.map((s) => finalText.indexOf(s)).filter((i) => i >= 0));
      if (Number.isFinite(cut)) finalText = finalText.slice(0, cut);
    }
    const seconds = Math.max(1e-6, (Date.now() - t0) / 1000);
    const result: GenerateJobResult = {
      tokens,
      text: finalText,
      tokensPerSecond: tokens.length / seconds,
      timeToFirstTokenMs: firstAt ? firstAt - t0 : 0,
      finishReason,
    };
    await registry.updateJob(d.jobId, { state: 'completed', progress: { tokens: tokens.length }, result });
    await registry.appendEvent(d.jobId, 'done', result);
    observe('completed');
    return result;
  } catch (e) {
    throw await recordFailure(ctx, d.jobId, 'generation', e, observe);
  } finally {
    ctx.running.delete(d.jobId);
    endPriority();
    if (loaded) ctx.cache.release(loaded);
  }
}
