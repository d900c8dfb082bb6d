import { createHash, randomUUID } from 'node:crypto';
import type { Redis } from 'ioredis';
import { EventHub, parseEntries } from './event-hub.js';
import { isId } from './ids.js';
import type {
  CheckpointRecord,
  CheckpointView,
  DatasetView,
  JobState,
  JobType,
  JobView,
  ModelRecord,
  ModelView,
} from './schemas.js';

const TERMINAL: readonly JobState[] = ['completed', 'failed', 'cancelled'];

/** True for a job state that never changes again. */
export function isTerminal(state: JobState): boolean {
  return TERMINAL.includes(state);
}

/** How a job ends (see Registry.endJob). */
export type JobEnd =
  | { state: 'completed'; result: Record<string, unknown>; progress?: Record<string, unknown> }
  | { state: 'cancelled'; data: Record<string, unknown>; progress?: Record<string, unknown> }
  | { state: 'failed'; error: string };

/** One entry of a job's event stream: the Redis Stream id, the event name and its JSON data. */
export interface JobEvent {
  id: string;
  event: string;
  data: Record<string, unknown>;
}

/** Fields a job update may set; `progress`/`result` are stored as JSON. */
export interface JobUpdate {
  state?: JobState;
  progress?: Record<string, unknown>;
  result?: Record<string, unknown>;
  error?: string;
}

// Updates a job hash unless it already reached a terminal state; returns 1 when applied.
const UPDATE_JOB = `
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return -1 end
if s == 'completed' or s == 'failed' or s == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1`;

// Appends events to streams in one round trip, each at most once; an event may end its job.
// KEYS: per event its stream, and for a job's end also its job's hash and its job's cancel flag; then
// this writer's mark (below). ARGV: the stream length bound, the TTL of an ended stream and job, this
// writer's id, the key prefix, then per event its arguments, by kind:
//   'e' (an event):      'e', name, data, ends, n
//   'x' (a job's end):   'x', jobId, name, data, fields, ends, n
//   'c' (a job's end that becomes a cancellation when one was requested):
//                        'c', jobId, name, data, fields, ends, n, altName, altData, altFields
// where data is JSON text, fields the job fields the end sets (a JSON list of names and values), ends
// 1 when the event ends the stream (which then expires after the TTL), and n the event's number among
// this writer's events. So a decoding step's token events, for every stream, are plain arguments
// that the script reads without decoding anything.
// An entry records its writer and number ('w' = "<writer>:<number>"): when a stream's last entry is
// this writer's with a number as high, the event is already there (a command sent again after a reply
// that Redis restarting lost), and it is not added twice. The writer's highest number so far is kept
// at the last key, "<prefix>:writer:<writer>" (with the TTL, written with the events): a number above
// it is new, and its stream is not looked at.
// An end applies only to a job that exists and has not ended: its fields are set, the job's record
// expires after the TTL and leaves its model's job set, and its event is appended; an end that does
// not apply appends nothing.
// Returns per event its entry id ('' for an end that did not apply) and, for an end, its job's state
// after it ('' for other events).
const APPEND_EVENTS = `
local out = {}
local mark = KEYS[#KEYS]
local high = tonumber(redis.call('GET', mark) or '0')
local top = high
local writer = ARGV[3]
local function terminal(s)
  return s == 'completed' or s == 'failed' or s == 'cancelled'
end
local function already(key, n)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if not last then return nil end
  local f = last[2]
  for j = 1, #f, 2 do
    if f[j] == 'w' then
      local w, m = string.match(f[j + 1], '^(.*):(%d+)$')
      if w == writer and tonumber(m) >= n then return last[1] end
    end
  end
  return nil
end
local k, a = 1, 5
while a <= #ARGV do
  local kind = ARGV[a]
  local stream, job, cancel, jobId, name, data, fields, ends, ns, alt
  if kind == 'e' then
    stream = KEYS[k]
    name, data, ends, ns = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
    k, a = k + 1, a + 5
  else
    stream, job, cancel = KEYS[k], KEYS[k + 1], KEYS[k + 2]
    jobId, name, data, fields, ends, ns = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
    if kind == 'c' then alt = a + 7 end
    k, a = k + 3, a + (kind == 'c' and 10 or 7)
  end
  local n = tonumber(ns)
  local id = nil
  if n <= high then id = already(stream, n) end
  if n > top then top = n end
  local append = true
  if id then
    append = false
  elseif kind ~= 'e' then
    local s = redis.call('HGET', job, 'state')
    if not s or terminal(s) then
      append = false
      id = ''
    else
      if alt and redis.call('EXISTS', cancel) == 1 then
        name, data, fields = ARGV[alt], ARGV[alt + 1], ARGV[alt + 2]
      end
      local f = cjson.decode(fields)
      if #f > 0 then redis.call('HSET', job, unpack(f)) end
      redis.call('EXPIRE', job, ARGV[2])
      local modelId = redis.call('HGET', job, 'modelId')
      if modelId then redis.call('SREM', ARGV[4] .. ':model:' .. modelId .. ':jobs', jobId) end
    end
  end
  if append then
    id = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[1], '*', 'event', name, 'data', data,
      'w', writer .. ':' .. ns)
    if ends == '1' then redis.call('EXPIRE', stream, ARGV[2]) end
  end
  out[#out + 1] = id
  out[#out + 1] = kind ~= 'e' and (redis.call('HGET', job, 'state') or '') or ''
end
redis.call('SET', mark, string.format('%d', top), 'EX', ARGV[2])
return out`;

const shas = new Map<string, string>();
/** A Lua script's SHA-1 digest, as EVALSHA names it. */
function scriptSha(body: string): string {
  let sha = shas.get(body);
  if (!sha) shas.set(body, (sha = createHash('sha1').update(body).digest('hex')));
  return sha;
}

/** Most entries a job's event stream keeps (about: trimmed by whole nodes). */
const EVENTS_MAXLEN = 100_000;

/** Events that end a job's stream (it expires after JOB_TTL_S). */
export const END_EVENTS = new Set(['completed', 'failed', 'cancelled', 'done']);

/** An event to append to a job's stream (`Registry.appendEvents`). */
export interface NewJobEvent {
  jobId: string;
  event: string;
  data: Record<string, unknown>;
  /** Set on a job's end event: the end it writes (the event is appended only when it ends the job). */
  end?: EndWrite;
}

/** A job's end as one event: its final fields, and what it becomes when a cancel was requested. */
export interface EndWrite {
  fields: Record<string, string>;
  /** When a cancel of the job was requested: it ends as cancelled, with this event and these fields. */
  ifCancelled?: { event: string; data: Record<string, unknown>; fields: Record<string, string> };
}

/**
 * What appending an event did: its entry id ('' for an end that did not apply) and, for a job's end,
 * the job's state then (null for other events).
 */
export interface AppendedEvent {
  id: string;
  state: JobState | null;
}

/** How long a finished job's record and event stream are kept (seconds). */
export const JOB_TTL_S = 7 * 24 * 3600;

/** The fields a job's final state sets. */
function endFields(end: JobEnd): Record<string, string> {
  const f: Record<string, string> = { state: end.state };
  if (end.state !== 'failed' && end.progress) f.progress = JSON.stringify(end.progress);
  if (end.state === 'completed') f.result = JSON.stringify(end.result);
  if (end.state === 'failed') f.error = end.error;
  return f;
}

/**
 * A job's end as an event for `Registry.writeEvents`: `done` (a generation's result) or `completed`,
 * `cancelled` with its data, `failed` {error}. With `ifCancelled`, a job whose cancel was requested
 * ends as cancelled instead, with that as its event's data and its progress.
 */
export function endEvent(
  jobId: string,
  type: 'train' | 'generate',
  end: JobEnd,
  ifCancelled?: Record<string, unknown>,
): NewJobEvent {
  const event =
    end.state === 'completed'
      ? type === 'generate'
        ? 'done'
        : 'completed'
      : end.state === 'failed'
        ? 'failed'
        : 'cancelled';
  const data =
    end.state === 'completed' ? end.result : end.state === 'failed' ? { error: end.error } : end.data;
  const write: EndWrite = { fields: endFields(end) };
  if (ifCancelled)
    write.ifCancelled = {
      event: 'cancelled',
      data: ifCancelled,
      fields: endFields({ state: 'cancelled', data: ifCancelled, progress: ifCancelled }),
    };
  return { jobId, event, data, end: write };
}

/**
 * The service's records in Redis: models, datasets, checkpoints, jobs, and the per-job event
 * streams that carry progress and generated tokens to whichever API instance serves the client.
 * Every key starts with `prefix:` so deployments (and test files) can share one Redis.
 */
export class Registry {
  /** This writer's id and the number of its last appended event (see appendEvents). */
  private readonly writer = randomUUID();
  private appended = 0;
  private hub: EventHub | null = null;
  private hubClosed = false;

  constructor(
    readonly redis: Redis,
    readonly prefix = 'xt',
  ) {}

  /**
   * Runs a Lua script by its digest (EVALSHA), sending its text only when Redis does not have it
   * (first use, or a restarted Redis): writes of every decoding step stay small.
   */
  private async script(body: string, numKeys: number, ...args: string[]): Promise<unknown> {
    const sha = scriptSha(body);
    try {
      return await this.redis.evalsha(sha, numKeys, ...args);
    } catch (e) {
      if (!String((e as Error).message).startsWith('NOSCRIPT')) throw e;
      return await this.redis.eval(body, numKeys, ...args);
    }
  }

  key(...parts: string[]): string {
    return [this.prefix, ...parts].join(':');
  }

  // ---- models ----

  async putModel(m: ModelRecord): Promise<void> {
    await this.redis
      .multi()
      .set(this.key('model', m.id), JSON.stringify(m))
      .zadd(this.key('models'), Date.parse(m.createdAt), m.id)
      .exec();
  }

  /** The model, or null when there is none (an id of another form names none). */
  async getModel(id: string): Promise<ModelRecord | null> {
    if (!isId(id)) return null;
    const raw = await this.redis.get(this.key('model', id));
    return raw ? (JSON.parse(raw) as ModelRecord) : null;
  }

  async listModels(): Promise<ModelRecord[]> {
    const ids = await this.redis.zrange(this.key('models'), '0', '-1');
    if (!ids.length) return [];
    const raws = await this.redis.mget(ids.map((i) => this.key('model', i)));
    return raws.filter((r): r is string => r !== null).map((r) => JSON.parse(r) as ModelRecord);
  }

  async deleteModel(id: string): Promise<void> {
    const ckpts = await this.redis.zrange(this.key('ckpts', id), '0', '-1');
    const m = this.redis
      .multi()
      .del(this.key('model', id), this.key('ckpts', id), this.key('model', id, 'jobs'))
      .zrem(this.key('models'), id);
    for (const c of ckpts) m.del(this.key('ckpt', c));
    await m.exec();
  }

  /** Points the model at a new weights file (relative to DATA_DIR). */
  async setModelWeights(id: string, weightsFile: string): Promise<ModelRecord | null> {
    const m = await this.getModel(id);
    if (!m) return null;
    m.weightsFile = weightsFile;
    m.weightsVersion = Date.now();
    await this.redis.set(this.key('model', id), JSON.stringify(m));
    return m;
  }

  async removeModelJob(modelId: string, jobId: string): Promise<void> {
    await this.redis.srem(this.key('model', modelId, 'jobs'), jobId);
  }

  /** Jobs still running or queued on the model (finished ones are pruned on the way). */
  async activeModelJobs(modelId: string): Promise<string[]> {
    const ids = await this.redis.smembers(this.key('model', modelId, 'jobs'));
    const live: string[] = [];
    for (const id of ids) {
      const j = await this.getJob(id);
      if (!j || isTerminal(j.state)) await this.removeModelJob(modelId, id);
      else live.push(id);
    }
    return live;
  }

  // ---- datasets ----

  async putDataset(d: DatasetView): Promise<void> {
    await this.redis
      .multi()
      .set(this.key('dataset', d.id), JSON.stringify(d))
      .zadd(this.key('datasets'), Date.parse(d.createdAt), d.id)
      .exec();
  }

  async getDataset(id: string): Promise<DatasetView | null> {
    if (!isId(id)) return null;
    const raw = await this.redis.get(this.key('dataset', id));
    return raw ? (JSON.parse(raw) as DatasetView) : null;
  }

  async listDatasets(): Promise<DatasetView[]> {
    const ids = await this.redis.zrange(this.key('datasets'), '0', '-1');
    if (!ids.length) return [];
    const raws = await this.redis.mget(ids.map((i) => this.key('dataset', i)));
    return raws.filter((r): r is string => r !== null).map((r) => JSON.parse(r) as DatasetView);
  }

  async deleteDataset(id: string): Promise<void> {
    await this.redis.multi().del(this.key('dataset', id)).zrem(this.key('datasets'), id).exec();
  }

  // ---- checkpoints ----

  /** Records a checkpoint; they are ordered by creation, so the last one is the newest. */
  async addCheckpoint(c: CheckpointRecord): Promise<void> {
    await this.redis
      .multi()
      .set(this.key('ckpt', c.id), JSON.stringify(c))
      .zadd(this.key('ckpts', c.modelId), Date.now(), c.id)
      .exec();
  }

  async listCheckpoints(modelId: string): Promise<CheckpointRecord[]> {
    const ids = await this.redis.zrange(this.key('ckpts', modelId), '0', '-1');
    if (!ids.length) return [];
    const raws = await this.redis.mget(ids.map((i) => this.key('ckpt', i)));
    return raws.filter((r): r is string => r !== null).map((r) => JSON.parse(r) as CheckpointRecord);
  }

  /** The newest checkpoint of a model, or of one job of it. */
  async latestCheckpoint(modelId: string, jobId?: string): Promise<CheckpointRecord | null> {
    const all = await this.listCheckpoints(modelId);
    const mine = jobId ? all.filter((c) => c.jobId === jobId) : all;
    return mine.length ? mine[mine.length - 1]! : null;
  }

  // ---- jobs ----

  async createJob(j: { id: string; type: JobType; modelId: string; data?: unknown }): Promise<JobView> {
    const view: JobView = {
      id: j.id,
      type: j.type,
      modelId: j.modelId,
      state: 'waiting',
      progress: {},
      createdAt: new Date().toISOString(),
    };
    await this.redis
      .multi()
      .hset(this.key('job', j.id), {
        type: view.type,
        modelId: view.modelId,
        state: view.state,
        progress: '{}',
        createdAt: view.createdAt,
      })
      .sadd(this.key('model', j.modelId, 'jobs'), j.id)
      .exec();
    return view;
  }

  async getJob(id: string): Promise<JobView | null> {
    if (!isId(id)) return null;
    const h = await this.redis.hgetall(this.key('job', id));
    if (!h.type) return null;
    const view: JobView = {
      id,
      type: h.type as JobType,
      modelId: h.modelId ?? '',
      state: (h.state ?? 'waiting') as JobState,
      progress: h.progress ? (JSON.parse(h.progress) as Record<string, unknown>) : {},
      createdAt: h.createdAt ?? '',
    };
    if (h.result) view.result = JSON.parse(h.result) as Record<string, unknown>;
    if (h.error) view.error = h.error;
    return view;
  }

  /**
   * Applies an update unless the job already finished (a cancelled job stays cancelled).
   * Returns false when the job was terminal or unknown. Terminal updates start the record's TTL.
   */
  async updateJob(id: string, u: JobUpdate): Promise<boolean> {
    const args: string[] = [];
    if (u.state) args.push('state', u.state);
    if (u.progress) args.push('progress', JSON.stringify(u.progress));
    if (u.result) args.push('result', JSON.stringify(u.result));
    if (u.error !== undefined) args.push('error', u.error);
    if (!args.length) return true;
    const r = (await this.script(UPDATE_JOB, 1, this.key('job', id), ...args)) as number;
    if (r === 1 && u.state && isTerminal(u.state)) {
      const job = await this.getJob(id);
      if (job) await this.removeModelJob(job.modelId, id);
      await this.redis.expire(this.key('job', id), JOB_TTL_S);
    }
    return r === 1;
  }

  /**
   * Ends a job, once, in one round trip: writes its final state (with its progress, result or error)
   * and, only when that write applied (the job had not ended already), appends the end event that
   * clients wait for: `done` (a generation's result) or `completed`, `cancelled` with `data`,
   * `failed` {error}. Returns whether this call ended the job.
   */
  async endJob(id: string, type: 'train' | 'generate', end: JobEnd): Promise<boolean> {
    const [r] = await this.writeEvents([endEvent(id, type, end)]);
    return r!.id !== '';
  }

  // ---- cancellation ----

  /** Asks whoever runs the job to stop; returns once the request is recorded. */
  async requestCancel(jobId: string): Promise<void> {
    await this.redis.set(this.key('cancel', jobId), '1', 'EX', JOB_TTL_S);
    await this.redis.publish(this.key('cancel'), jobId);
  }

  async isCancelRequested(jobId: string): Promise<boolean> {
    return (await this.redis.exists(this.key('cancel', jobId))) === 1;
  }

  /** The channel cancel requests are published on (payload: job id). */
  get cancelChannel(): string {
    return this.key('cancel');
  }

  // ---- event streams ----

  eventsKey(jobId: string): string {
    return this.key('events', jobId);
  }

  /** Appends an event to the job's stream; returns its id (the SSE `id:`). */
  async appendEvent(jobId: string, event: string, data: Record<string, unknown>): Promise<string> {
    return (await this.appendEvents([{ jobId, event, data }]))[0]!;
  }

  /**
   * Appends events, in order, to their jobs' streams in one round trip (a job may appear several
   * times); returns their ids. What `appendEvent` does for each, in one script.
   */
  async appendEvents(events: NewJobEvent[]): Promise<string[]> {
    return (await this.writeEvents(events)).map((e) => e.id);
  }

  /**
   * `appendEvents`, with job ends among the events (`endEvent`): each end applies only when its job
   * had not ended. Returns per event its entry id ('' for an end that did not apply) and its job's state.
   */
  async writeEvents(events: NewJobEvent[]): Promise<AppendedEvent[]> {
    if (!events.length) return [];
    const keys: string[] = [];
    const args: string[] = [String(EVENTS_MAXLEN), String(JOB_TTL_S), this.writer, this.prefix];
    const flatFields = (f: Record<string, string>) => JSON.stringify(Object.entries(f).flat());
    for (const e of events) {
      const n = String(++this.appended);
      const ends = END_EVENTS.has(e.event) ? '1' : '0';
      const data = JSON.stringify(e.data);
      if (!e.end) {
        keys.push(this.eventsKey(e.jobId));
        args.push('e', e.event, data, ends, n);
        continue;
      }
      keys.push(this.eventsKey(e.jobId), this.key('job', e.jobId), this.key('cancel', e.jobId));
      const alt = e.end.ifCancelled;
      args.push(alt ? 'c' : 'x', e.jobId, e.event, data, flatFields(e.end.fields), ends, n);
      if (alt) args.push(alt.event, JSON.stringify(alt.data), flatFields(alt.fields));
    }
    keys.push(this.key('writer', this.writer));
    const flat = (await this.script(APPEND_EVENTS, keys.length, ...keys, ...args)) as string[];
    const out: AppendedEvent[] = [];
    for (let i = 0; i < flat.length; i += 2)
      out.push({ id: flat[i]!, state: flat[i + 1] ? (flat[i + 1] as JobState) : null });
    return out;
  }

  /**
   * The hub through which this process follows job event streams (one blocking read over all of
   * them, see EventHub), started on first use.
   */
  get events(): EventHub {
    if (this.hubClosed) throw new Error('Registry: event followers are closed');
    return (this.hub ??= new EventHub(this.redis));
  }

  /** Closes the event hub's connection; followers started after this fail. */
  closeReaders(): void {
    this.hubClosed = true;
    this.hub?.close();
  }

  /** Reads the events after `afterId` ('0' from the start) that are there now. */
  async readEvents(jobId: string, afterId: string): Promise<JobEvent[]> {
    const res = await this.redis.xread('COUNT', 1000, 'STREAMS', this.eventsKey(jobId), afterId);
    if (!res) return [];
    return res.flatMap(([, entries]) => parseEntries(entries));
  }
}

/** Public view of a stored model (drops where its files live). */
export function modelView(m: ModelRecord): ModelView {
  return {
    id: m.id,
    name: m.name,
    config: m.config,
    parameters: m.parameters,
    tokenizer: m.tokenizer,
    createdAt: m.createdAt,
  };
}

/** Public view of a stored checkpoint. */
export function checkpointView(c: CheckpointRecord): CheckpointView {
  return { id: c.id, modelId: c.modelId, jobId: c.jobId, step: c.step, loss: c.loss, createdAt: c.createdAt };
}
