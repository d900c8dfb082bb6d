import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeEnv, tinyDecoder, type TestEnv } from './helpers.js';

describe('models built on the builder thread', () => {
  let env: TestEnv;
  beforeAll(async () => {
    env = await makeEnv({});
  });
  afterAll(async () => env?.close());

  it('a bad definition built off the loop is still refused naming the field', async () => {
    const r = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'bad', config: tinyDecoder({ attnLayers: { depth: -2 } }) },
    });
    expect(r.statusCode).toBe(400);
    expect(r.json().message).toMatch(/^config\.attnLayers\.depth: /);
  });
});
