import type { FastifyReply } from 'fastify';
import type { JobEvent, Registry } from '../models/registry.js';
import { isTerminal } from '../models/registry.js';

/** Event names that end a job's stream. */
export const END_EVENTS = new Set(['completed', 'failed', 'cancelled', 'done']);

/**
 * Follows a job's Redis Stream from after `fromId` ('0' = from the start), yielding events until an
 * end event, or until `signal` aborts. Uses a connection of its own for the blocking reads. When the
 * stream has expired but the job record says it finished, yields one synthesised end event.
 */
export async function* followEvents(
  registry: Registry,
  jobId: string,
  fromId: string,
  signal: AbortSignal,
): AsyncGenerator<JobEvent> {
  const conn = registry.redis.duplicate({ maxRetriesPerRequest: 1 });
  const onAbort = () => conn.disconnect();
  signal.addEventListener('abort', onAbort);
  let last = fromId;
  try {
    while (!signal.aborted) {
      let events: JobEvent[];
      try {
        events = await registry.readEvents(jobId, last, 2000, conn);
      } catch (e) {
        if (signal.aborted) return;
        throw e;
      }
      for (const ev of events) {
        last = ev.id;
        yield ev;
        if (END_EVENTS.has(ev.event)) return;
      }
      if (!events.length) {
        const job = await registry.getJob(jobId);
        if (!job) return;
        if (isTerminal(job.state)) {
          // the end event may have been written just now: read once more before synthesising
          const tail = await registry.readEvents(jobId, last, 0);
          if (tail.length) {
            for (const ev of tail) {
              last = ev.id;
              yield ev;
              if (END_EVENTS.has(ev.event)) return;
            }
            continue;
          }
          const name =
            job.state === 'completed' ? (job.type === 'generate' ? 'done' : 'completed') : job.state;
          yield {
            id: last === '0' ? '0-1' : last,
            event: name,
            data: job.result ?? (job.error ? { error: job.error } : {}),
          };
          return;
        }
      }
    }
  } finally {
    signal.removeEventListener('abort', onAbort);
    conn.disconnect();
  }
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
