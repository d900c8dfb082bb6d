import type { FastifyReply } from 'fastify';
import { END_EVENTS, isTerminal, Registry, type JobEvent } from '../models/registry.js';
import type { JobView } from '../models/schemas.js';

/** How long a follower keeps retrying while Redis is unreachable before it gives up. */
export const REDIS_OUTAGE_MS = 30_000;

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
 * end event, or until `signal` aborts. Reads on a connection of its own, whose commands fail fast
 * while Redis is away: the follower keeps its place and retries until Redis is back, and throws
 * once it has been unreachable for `outageMs`. When the stream has expired but the job record says
 * it finished, yields one synthesised end event.
 */
export async function* followEvents(
  registry: Registry,
  jobId: string,
  fromId: string,
  signal: AbortSignal,
  outageMs = REDIS_OUTAGE_MS,
): AsyncGenerator<JobEvent> {
  const conn = registry.readerConnection();
  const reader = new Registry(conn, registry.prefix);
  const onAbort = () => conn.disconnect();
  signal.addEventListener('abort', onAbort);
  let last = fromId;
  let failingSince = 0;
  // the connection goes back for another follower unless a read may still be waiting on it
  let reusable = false;
  try {
    while (!signal.aborted) {
      let events: JobEvent[];
      let job: JobView | null = null;
      try {
        events = await reader.readEvents(jobId, last, 2000, conn);
        if (!events.length) job = await reader.getJob(jobId);
        failingSince = 0;
      } catch (e) {
        if (signal.aborted) return;
        failingSince ||= Date.now();
        if (Date.now() - failingSince > outageMs) throw e;
        await sleep(200, signal);
        continue;
      }
      for (const ev of events) {
        last = ev.id;
        // (a reader that stops here, once it has this event, leaves no read behind)
        reusable = true;
        yield ev;
        reusable = false;
        if (END_EVENTS.has(ev.event)) {
          reusable = true;
          return;
        }
      }
      if (events.length) continue;
      if (!job) return;
      if (isTerminal(job.state)) {
        // the end event may have been written just now: read once more before synthesising
        const tail = await reader.readEvents(jobId, last, 0);
        if (tail.length) {
          for (const ev of tail) {
            last = ev.id;
            yield ev;
            if (END_EVENTS.has(ev.event)) return;
          }
          continue;
        }
        const name = job.state === 'completed' ? (job.type === 'generate' ? 'done' : 'completed') : job.state;
        yield {
          id: last === '0' ? '0-1' : last,
          event: name,
          data: job.result ?? (job.error ? { error: job.error } : {}),
        };
        return;
      }
    }
  } finally {
    signal.removeEventListener('abort', onAbort);
    registry.releaseReader(conn, reusable && !signal.aborted);
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
    if (!this.ended && !this.reply.raw.writableEnded) this.reply.raw.write(chunk);
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
