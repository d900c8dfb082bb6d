import type { FastifyReply } from 'fastify';
import { isTerminal, Registry, type JobEvent } from '../models/registry.js';
import type { JobView } from '../models/schemas.js';

/** Event names that end a job's stream. */
export const END_EVENTS = new Set(['completed', 'failed', 'cancelled', 'done']);

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
  const conn = registry.redis.duplicate({ maxRetriesPerRequest: 1 });
  conn.on('error', () => undefined); // reported through the failing reads below
  const reader = new Registry(conn, registry.prefix);
  const onAbort = () => conn.disconnect();
  signal.addEventListener('abort', onAbort);
  let last = fromId;
  let failingSince = 0;
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
        yield ev;
        if (END_EVENTS.has(ev.event)) return;
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
    conn.disconnect();
  }
}

/**
 * Sends a job's events on an SSE response (started with `startSse`) until its end event, the
 * client going away (`gone`), or the server shutting down (`closing`). A stream that cannot go on
 * ends with an `error` event that says why and carries no id, so the client reconnects with the
 * Last-Event-ID it has and loses nothing. Returns whether the job's end event was sent.
 */
export async function pipeEvents(
  reply: FastifyReply,
  registry: Registry,
  jobId: string,
  fromId: string,
  signals: { gone: AbortSignal; closing: AbortSignal },
  onEvent: (ev: JobEvent) => void = () => undefined,
): Promise<boolean> {
  const signal = AbortSignal.any([signals.gone, signals.closing]);
  // keeps proxies from closing a quiet stream (a job waiting for a worker, Redis away)
  const heartbeat = setInterval(() => reply.raw.write(': ping\n\n'), 15_000);
  let ended = false;
  try {
    for await (const ev of followEvents(registry, jobId, fromId, signal)) {
      onEvent(ev);
      writeSse(reply, ev);
      if (END_EVENTS.has(ev.event)) ended = true;
    }
    if (!ended && signals.closing.aborted && !signals.gone.aborted)
      writeSseError(reply, 'the server is shutting down; reconnect with Last-Event-ID to continue');
    else if (!ended && !signal.aborted)
      writeSseError(reply, `job ${jobId} has no events any more; read it at /v1/jobs/${jobId}`);
  } catch (e) {
    reply.log.warn({ err: (e as Error).message, jobId }, 'event stream interrupted');
    writeSseError(
      reply,
      `event stream interrupted (${(e as Error).message}); reconnect with Last-Event-ID to continue`,
    );
  } finally {
    clearInterval(heartbeat);
    reply.raw.end();
  }
  return ended;
}

/** Writes an `error` event without an id (the client's Last-Event-ID stays the last real event). */
export function writeSseError(reply: FastifyReply, message: string): void {
  reply.raw.write(`event: error\ndata: ${JSON.stringify({ message })}\n\n`);
}

/** Starts a server-sent-events response on the raw socket (Fastify stops handling the reply). */
export function startSse(reply: FastifyReply): void {
  reply.hijack();
  reply.raw.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache, no-transform',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  });
  reply.raw.write(': stream open\n\n');
}

/** Writes one SSE event with its id (a client resumes after it with Last-Event-ID). */
export function writeSse(reply: FastifyReply, ev: { id: string; event: string; data: unknown }): void {
  reply.raw.write(`id: ${ev.id}\nevent: ${ev.event}\ndata: ${JSON.stringify(ev.data)}\n\n`);
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
