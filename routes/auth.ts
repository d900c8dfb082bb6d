import { timingSafeEqual } from 'node:crypto';

function keyMatches(given: string, keys: Buffer[]): boolean {
  const g = Buffer.from(given);
  let ok = false;
  for (const k of keys) if (k.length === g.length && timingSafeEqual(k, g)) ok = true;
  return ok;
}

/**
 * Checks an Authorization header against the bearer keys: null when it passes (or no keys are set),
 * else the message to answer 401 with.
 */
export function bearerRefusal(header: string | undefined, keys: Buffer[]): string | null {
  if (!keys.length) return null;
  const m = /^Bearer\s+(.+)$/i.exec(header ?? '');
  if (!m) return 'Authorization: expected "Bearer <key>"';
  return keyMatches(m[1]!.trim(), keys) ? null : 'Authorization: the bearer key is not valid';
}
