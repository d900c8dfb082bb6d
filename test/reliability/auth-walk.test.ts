import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeEnv, type TestEnv } from '../service/helpers.js';

const OPEN = new Set(['/healthz', '/readyz', '/metrics']);

describe('API keys on every route of the OpenAPI document', () => {
  let env: TestEnv;
  let routes: [string, string][] = [];
  beforeAll(async () => {
    env = await makeEnv({ app: { apiKeys: ['k1'] } });
    // the live document: a route added later is walked too
    const doc = env.app.swagger() as { paths: Record<string, Record<string, unknown>> };
    routes = Object.entries(doc.paths).flatMap(([p, methods]) =>
      Object.keys(methods).map((m) => [m.toUpperCase(), p] as [string, string]),
    );
  });
  afterAll(async () => env?.close());

  it('every route but the health and metrics ones answers 401 without a key, a wrong key or a malformed header', async () => {
    const guarded = routes.filter(([, p]) => !OPEN.has(p));
    expect(guarded.length).toBeGreaterThanOrEqual(15);
    for (const [method, p] of guarded) {
      const url = p.replace(/\{[^}]+\}/g, 'some-id');
      for (const authorization of [
        undefined,
        'Bearer nope',
        'Bearer',
        'Basic azE=',
        'k1',
        'Bearer k1x',
        'bearer  k2',
      ]) {
        const r = await env.app.inject({
          method: method as 'GET',
          url,
          headers: authorization === undefined ? {} : { authorization },
          ...(method === 'POST' || method === 'PUT' ? { payload: {} } : {}),
        });
        expect([method, p, authorization, r.statusCode]).toEqual([method, p, authorization, 401]);
        // the OpenAI-compatible routes answer in OpenAI's error shape
        expect(r.json()).toMatchObject(
          p.startsWith('/openai/')
            ? { error: { type: 'authentication_error', code: 'invalid_api_key' } }
            : { statusCode: 401, error: 'Unauthorized' },
        );
      }
      // with the key the request gets past authentication (404 for the made-up id, 400 for the body)
      const ok = await env.app.inject({
        method: method as 'GET',
        url,
        headers: { authorization: 'Bearer k1' },
        ...(method === 'POST' || method === 'PUT' ? { payload: {} } : {}),
      });
      expect([method, p, ok.statusCode]).not.toEqual([method, p, 401]);
    }
  });

  it('the open routes answer without a key', async () => {
    for (const p of OPEN) {
      const r = await env.app.inject({ method: 'GET', url: p });
      expect([p, r.statusCode === 401]).toEqual([p, false]);
    }
  });
});
