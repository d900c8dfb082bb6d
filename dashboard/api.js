// The dashboard's client for the service's /v1 API: JSON calls, uploads with progress, and
// server-sent events read over fetch (so the API key travels as a header, and a reconnect can send
// Last-Event-ID). Every failure becomes an ApiError carrying the service's own message.

const KEY_ITEM = 'xt-api-key';

export const apiKey = () => sessionStorage.getItem(KEY_ITEM) ?? '';
export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, authorization: `Bearer ${key}` } : { ...extra };
}

/** An HTTP error from the service: `message` is its {statusCode, error, message} message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function errorFrom(status, text) {
  let message = text;
  try {
    const body = JSON.parse(text);
    message = body.message ?? body.error?.message ?? text;
  } catch {
    // not JSON: the text as it came
  }
  return new ApiError(status, `${status}: ${message || 'no message'}`);
}

/** A JSON call; resolves to the parsed body (null for 204). */
export async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (!res.ok) throw errorFrom(res.status, await res.text());
  return res.status === 204 ? null : res.json();
}

/** A download as a Blob (e.g. weights). */
export async function download(path) {
  const res = await fetch(path, { headers: headers() });
  if (!res.ok) throw errorFrom(res.status, await res.text());
  return res.blob();
}

/** Uploads a file as multipart/form-data; `onProgress(fraction)` follows the bytes sent. */
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', path);
    for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1);
        resolve(JSON.parse(xhr.responseText));
      } else reject(errorFrom(xhr.status, xhr.responseText));
    };
    xhr.onerror = () => reject(new ApiError(0, `upload failed: the service could not be reached`));
    const form = new FormData();
    form.append('file', file, file.name);
    xhr.send(form);
  });
}

/**
 * Reads a server-sent-events response: yields {id, event, data} until the stream ends. `init` may
 * carry `method`, a JSON `body`, `lastEventId` and an AbortSignal.
 */
export async function* events(path, init = {}) {
  const h = headers({ accept: 'text/event-stream' });
  if (init.lastEventId) h['last-event-id'] = init.lastEventId;
  if (init.body !== undefined) h['content-type'] = 'application/json';
  const res = await fetch(path, {
    method: init.method ?? 'GET',
    headers: h,
    body: init.body === undefined ? undefined : JSON.stringify(init.body),
    signal: init.signal,
  });
  if (!res.ok) throw errorFrom(res.status, await res.text());
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const ev = parseEvent(buf.slice(0, cut));
      buf = buf.slice(cut + 2);
      if (ev) yield ev;
    }
  }
}

function parseEvent(block) {
  let id;
  let event = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
    if (field === 'id') id = value;
    else if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
  }
  if (!data.length) return null;
  return { id, event, data: JSON.parse(data.join('\n')) };
}

const END_EVENTS = new Set(['completed', 'failed', 'cancelled', 'done']);

/**
 * Follows a job's events to its end, reconnecting with Last-Event-ID after a dropped connection
 * or an `error` event, so nothing is lost or repeated. `onEvent(ev)` gets each event;
 * `onTrouble(message)` each interruption. `stop()` ends it; `reconnect()` closes the current
 * connection (the follower then resumes after the last event it had).
 */
export function followJob(jobId, onEvent, onTrouble) {
  let stopped = false;
  let connection = null;
  let lastEventId = '';
  const run = async () => {
    while (!stopped) {
      connection = new AbortController();
      try {
        for await (const ev of events(`/v1/jobs/${jobId}/events`, {
          lastEventId,
          signal: connection.signal,
        })) {
          if (ev.event === 'error') {
            onTrouble(ev.data.message);
            break;
          }
          if (ev.id) lastEventId = ev.id;
          onEvent(ev);
          if (END_EVENTS.has(ev.event)) return;
        }
      } catch (e) {
        if (stopped) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) {
          onTrouble(e.message);
          return;
        }
        if (!connection.signal.aborted) onTrouble(`event stream interrupted (${e.message}); reconnecting`);
      }
      if (!stopped && !connection.signal.aborted) await new Promise((r) => setTimeout(r, 1000));
    }
  };
  const done = run();
  return {
    done,
    get lastEventId() {
      return lastEventId;
    },
    stop() {
      stopped = true;
      connection?.abort();
    },
    reconnect() {
      connection?.abort();
    },
  };
}
