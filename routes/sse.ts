import type { FastifyReply } from 'fastify';
import { END_EVENTS, isTerminal, Registry, type JobEvent } from '../models/registry.js';
import type { JobView } from '../models/schemas.js';

/** How long a follower keeps retrying while Redis is unreachable before it gives up. */
export const REDIS_OUTAGE_MS = 30_000;

/** How long a follower waits for events before it looks at its job's record. */
const QUIET_MS = 2000;

const sleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener('abort', done);
      resolve();
    }
    signal.addEventListener('abort', done);
  });

/**
 * Follows a job's Redis Stream from after `fromId` ('0' = from the start), yielding events until an
 * end event, or until `signal` aborts. Reads through the registry's event hub (one blocking read for
 * every follower of the process). While Redis is unreachable the follower keeps its place and waits
 * for it, and throws once it has been unreachable for `outageMs`. When the stream stays quiet and
 * the job's record says it finished (or the record is gone), it reads the stream once more and, when
 * the end event is not there (the stream expired), yields one synthesised from the record.
 */
export async function* followEvents(
  registry: Registry,
  jobId: string,
  fromId: string,
  signal: AbortSignal,
  outageMs = REDIS_OUTAGE_MS,
): AsyncGenerator<JobEvent> {
  const hub = registry.events;
  const sub = hub.subscribe(registry.eventsKey(jobId), fromId);
  let failingSince = 0;
  const failing = (e: unknown) => {
    failingSince ||= Date.now();
    if (Date.now() - failingSince > outageMs) throw e;
  };
  try {
    while (!signal.aborted) {
      await sub.wait(QUIET_MS, signal);
      if (signal.aborted) return;
      const events = sub.take();
      for (const ev of events) {
        yield ev;
        if (END_EVENTS.has(ev.event)) return;
      }
      if (events.length) continue;
      if (hub.failingSince) {
        // the hub's reads fail: wait for Redis, up to outageMs from when they began to
        if (Date.now() - hub.failingSince > outageMs) throw hub.lastError ?? new Error('Redis unreachable');
        continue;
      }
      let job: JobView | null;
      try {
        job = await registry.getJob(jobId);
        failingSince = 0;
      } catch (e) {
        if (signal.aborted) return;
        failing(e);
        await sleep(200, signal);
        continue;
      }
      if (!job) return;
      if (!isTerminal(job.state) || sub.pending) continue;
      // the end event may have been written just now: read once more before synthesising (what the
      // read finds goes through the subscription, which drops what the hub has delivered already)
      try {
        sub.deliver(await registry.readEvents(jobId, sub.position));
      } catch (e) {
        if (signal.aborted) return;
        failing(e);
        continue;
      }
      if (sub.pending) continue;
      const name = job.state === 'completed' ? (job.type === 'generate' ? 'done' : 'completed') : job.state;
      yield {
        id: sub.position === '0' ? '0-1' : sub.position,
        event: name,
        data: job.result ?? (job.error ? { error: job.error } : {}),
      };
      return;
    }
  } finally {
    sub.close();
  }
}

/** How often a quiet stream sends a comment, so that proxies keep it open. */
export const SSE_HEARTBEAT_MS = 15_000;

/**
 * The one writer of server-sent events: starts the response on the raw socket (Fastify stops
 * handling the reply), sends a `: ping` comment every `heartbeatMs` while it is open (a job waiting
 * for a worker, Redis away, a long prefill), and ends the response once.
 */
export class SseWriter {
  private readonly heartbeat: NodeJS.Timeout;
  private ended = false;
  /** whether writes are held for this turn (see write) */
  private corked = false;

  constructor(
    private readonly reply: FastifyReply,
    heartbeatMs = SSE_HEARTBEAT_MS,
  ) {
    reply.hijack();
    reply.raw.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache, no-transform',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
    });
    this.write(': stream open\n\n');
    this.heartbeat = setInterval(() => this.write(': ping\n\n'), heartbeatMs);
  }

  /** One named event; with an id, a client resumes after it with Last-Event-ID. */
  event(ev: { id?: string; event: string; data: unknown }): void {
    this.write(
      `${ev.id !== undefined ? `id: ${ev.id}\n` : ''}event: ${ev.event}\ndata: ${JSON.stringify(ev.data)}\n\n`,
    );
  }

  /** An unnamed `data:` message (OpenAI's streaming chunks); a string is sent as it is. */
  data(payload: unknown): void {
    this.write(`data: ${typeof payload === 'string' ? payload : JSON.stringify(payload)}\n\n`);
  }

  /** An `error` event without an id (the client's Last-Event-ID stays the last real event). */
  error(message: string): void {
    this.event({ event: 'error', data: { message } });
  }

  /** Ends the response (once) and its heartbeat. */
  end(): void {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.heartbeat);
    this.reply.raw.end();
  }

  private write(chunk: string): void {
    const raw = this.reply.raw;
    if (this.ended || raw.writableEnded) return;
    // what is written in one turn (the events one read of the job's stream brought: a worker
    // writes several decoding steps' tokens at once) leaves in one write to the socket
    if (!this.corked) {
      this.corked = true;
      raw.cork();
      process.nextTick(() => {
        this.corked = false;
        raw.uncork();
      });
    }
    raw.write(chunk);
  }
}

/**
 * Sends a job's events on an SSE stream until its end event, the client going away (`gone`), or
 * the server shutting down (`closing`), then ends the stream. A stream that cannot go on ends with
 * an `error` event that says why and carries no id, so the client reconnects with the Last-Event-ID
 * it has and loses nothing. Returns whether the job's end event was sent.
 */
export async function pipeEvents(
  sse: SseWriter,
  registry: Registry,
  jobId: string,
  fromId: string,
  signals: { gone: AbortSignal; closing: AbortSignal },
  log: { warn(obj: object, msg: string): void },
  onEvent: (ev: JobEvent) => void = () => undefined,
): Promise<boolean> {
  const signal = AbortSignal.any([signals.gone, signals.closing]);
  let ended = false;
  try {
    for await (const ev of followEvents(registry, jobId, fromId, signal)) {
      onEvent(ev);
      sse.event(ev);
      if (END_EVENTS.has(ev.event)) ended = true;
    }
    if (!ended && signals.closing.aborted && !signals.gone.aborted)
      sse.error('the server is shutting down; reconnect with Last-Event-ID to continue');
    else if (!ended && !signal.aborted)
      sse.error(`job ${jobId} has no events any more; read it at /v1/jobs/${jobId}`);
  } catch (e) {
    log.warn({ err: (e as Error).message, jobId }, 'event stream interrupted');
    sse.error(`event stream interrupted (${(e as Error).message}); reconnect with Last-Event-ID to continue`);
  } finally {
    sse.end();
  }
  return ended;
}

/** An AbortSignal that fires when the client goes away before the response is finished. */
export function clientGone(reply: FastifyReply): AbortController {
  const ac = new AbortController();
  reply.raw.on('close', () => {
    if (!reply.raw.writableFinished) ac.abort();
  });
  return ac;
}

/** A valid Redis Stream id to resume after, from a Last-Event-ID header; '0' otherwise. */
export function resumeId(header: string | string[] | undefined): string {
  const v = Array.isArray(header) ? header[0] : header;
  return v && /^\d+-\d+$/.test(v.trim()) ? v.trim() : '0';
}
