import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as prettier from 'prettier';
import { buildApp } from '../routes/app.js';

/**
 * The OpenAPI document of the API, formatted as committed in openapi/openapi.json. Builds the app
 * without connecting anywhere useful (Redis is never contacted to describe routes).
 */
export async function generateOpenApi(): Promise<string> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'xt-openapi-'));
  const app = await buildApp({ redisUrl: 'redis://127.0.0.1:1', dataDir: dir });
  try {
    await app.ready();
    const doc = app.swagger();
    return prettier.format(JSON.stringify(doc), { parser: 'json' });
  } finally {
    await app.close().catch(() => undefined);
    rmSync(dir, { recursive: true, force: true });
  }
}
