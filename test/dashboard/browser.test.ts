import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import { makeEnv, type TestEnv } from '../service/helpers.js';

// The dashboard in a real browser: Debian's chromium (installed by `npm run setup`), or the one
// CHROMIUM_PATH names. Without a browser the test fails: it is part of the suite.
const ARTIFACTS = path.resolve('test-artifacts/dashboard');
const KEY = 'dashboard-key';
const STEPS = 40;

function chromiumPath(): string {
  if (process.env.CHROMIUM_PATH) return process.env.CHROMIUM_PATH;
  for (const name of ['chromium', 'chromium-browser']) {
    try {
      return execFileSync('sh', ['-c', `command -v ${name}`], { encoding: 'utf8' }).trim();
    } catch {
      // try the next name
    }
  }
  throw new Error(
    'chromium is not installed: run `npm run setup` (apt-get install chromium) or set CHROMIUM_PATH',
  );
}

describe('dashboard in a browser: create, upload, train with a live chart, stream a generation', () => {
  let env: TestEnv;
  let base: string;
  let browser: Browser;
  let page: Page;
  let profile: string;
  const offsite: string[] = [];
  const eventRequests: { url: string; lastEventId?: string }[] = [];
  // (one test) generation requests answered by a stream that closes after a token, without its end
  let cutGenerations = false;

  beforeAll(async () => {
    const executablePath = chromiumPath();
    expect(existsSync(executablePath), `${executablePath} exists`).toBe(true);
    env = await makeEnv({ app: { apiKeys: [KEY] }, workers: true });
    base = await env.app.listen({ port: 0, host: '127.0.0.1' });
    profile = mkdtempSync(path.join(os.tmpdir(), 'xt-chromium-'));
    mkdirSync(ARTIFACTS, { recursive: true });
    browser = await puppeteer.launch({
      executablePath,
      headless: true,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        `--user-data-dir=${profile}`,
      ],
    });
    page = await browser.newPage();
    await page.setViewport({ width: 1400, height: 1000 });
    // nothing may come from another host: such a request is refused and recorded
    await page.setRequestInterception(true);
    page.on('request', (req) => {
      const url = req.url();
      if (cutGenerations && url.startsWith(base) && url.endsWith('/generate')) {
        void req.respond({
          status: 200,
          contentType: 'text/event-stream',
          body:
            'id: 0-0\nevent: start\ndata: {"jobId":"cut-short","promptTokens":3}\n\n' +
            'id: 1-0\nevent: token\ndata: {"index":0,"tokenId":104,"text":"h"}\n\n',
        });
        return;
      }
      if (url.startsWith(base) || url.startsWith('blob:') || url.startsWith('data:')) {
        if (url.includes('/events')) eventRequests.push({ url, lastEventId: req.headers()['last-event-id'] });
        void req.continue();
      } else {
        offsite.push(url);
        void req.abort();
      }
    });
  });
  afterAll(async () => {
    await browser?.close();
    await env?.close();
    if (profile) rmSync(profile, { recursive: true, force: true });
  });

  const text = (sel: string) => page.$eval(sel, (e) => e.textContent ?? '');

  it('shows the service error without a key, and loads once the key is given', async () => {
    await page.goto(base + '/', { waitUntil: 'load' });
    await page.waitForFunction(() => document.querySelector('#errors li')?.textContent?.includes('401'));
    await page.type('#api-key', KEY);
    await page.click('#key-form button');
    await page.waitForFunction(() => document.querySelectorAll('#errors li').length === 0);
    const stored = await page.evaluate(() => sessionStorage.getItem('xt-api-key'));
    expect(stored).toBe(KEY);
  });

  it('counts a preset’s parameters before creating it, then creates it', async () => {
    await page.select('#model-preset', 'tiny-gpt');
    await page.waitForFunction(
      () => document.querySelector<HTMLElement>('#model-count')?.dataset.state === 'ok',
    );
    const counted = Number(await page.$eval('#model-count', (e) => (e as HTMLElement).dataset.parameters));
    await page.click('#model-create');
    await page.waitForSelector('#model-rows tr');
    const listed = (
      await env.app.inject({ method: 'GET', url: '/v1/models', headers: { authorization: `Bearer ${KEY}` } })
    ).json().models as { id: string; parameters: number; name: string }[];
    expect(listed).toHaveLength(1);
    expect(listed[0]!.name).toBe('tiny-gpt');
    expect(counted).toBe(listed[0]!.parameters);
  });

  it('names the field of a bad definition', async () => {
    await page.$eval('#model-config', (e) => {
      const t = e as HTMLTextAreaElement;
      t.value = JSON.stringify({
        wrapper: 'TransformerWrapper',
        num_tokens: 256,
        max_seq_len: 64,
        attn_layers: { type: 'Decoder', dim: 32, depth: -2 },
      });
      t.dispatchEvent(new Event('input'));
    });
    await page.waitForFunction(
      () => document.querySelector<HTMLElement>('#model-count')?.dataset.state === 'error',
    );
    expect(await text('#model-count')).toContain('depth');
  });

  it('uploads a text file with progress and lists it', async () => {
    const file = path.join(env.dataDir, 'fox.txt');
    writeFileSync(file, 'the quick brown fox jumps over the lazy dog. '.repeat(300));
    const input = await page.$('#dataset-file');
    await (input as unknown as { uploadFile(p: string): Promise<void> }).uploadFile(file);
    await page.click('#dataset-upload');
    await page.waitForSelector('#dataset-rows tr');
    expect(await text('#dataset-rows tr td')).toBe('fox.txt');
    expect(await page.$eval('#dataset-progress', (e) => (e as HTMLProgressElement).value)).toBe(1);
  });

  it('trains, drawing every step on the chart, and resumes after a dropped stream', async () => {
    await page.evaluate((steps) => {
      const set = (id: string, v: string) => ((document.getElementById(id) as HTMLInputElement).value = v);
      set('train-steps', String(steps));
      set('train-batch', '8');
      set('train-seq', '32');
      set('train-lr', '0.005');
      set('train-warmup', '5');
      set('train-ckpt', '20');
      set('train-seed', '1');
    }, STEPS);
    await page.click('#train-start');
    // once some steps are drawn, drop the connection: the follower reconnects with Last-Event-ID
    await page.waitForFunction(() => Number(document.getElementById('loss-chart')!.dataset.points) >= 5, {
      timeout: 60_000,
    });
    const lastId = await page.evaluate(() => {
      const t = (window as any).dashboard.training;
      const id = t.follower.lastEventId;
      t.follower.reconnect();
      return id;
    });
    await page.waitForFunction(
      (steps) => Number(document.getElementById('loss-chart')!.dataset.points) === steps,
      { timeout: 90_000 },
      STEPS,
    );
    await page.waitForFunction(() => document.getElementById('job-state')!.dataset.state === 'completed', {
      timeout: 30_000,
    });
    expect(eventRequests.length).toBeGreaterThanOrEqual(2);
    expect(eventRequests[0]!.lastEventId).toBeUndefined();
    expect(eventRequests.some((r) => r.lastEventId === lastId)).toBe(true);
    const steps = await page.evaluate(() => (window as any).dashboard.training.data[0] as number[]);
    expect(steps).toEqual(Array.from({ length: STEPS }, (_, i) => i + 1));
    const losses = await page.evaluate(() => (window as any).dashboard.training.data[1] as number[]);
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    expect(mean(losses.slice(-5))).toBeLessThan(mean(losses.slice(0, 5)));
    expect(await page.$$eval('#job-checkpoints li', (l) => l.length)).toBeGreaterThanOrEqual(2);
    await page.screenshot({ path: path.join(ARTIFACTS, 'training.png'), fullPage: true });
  });

  it('shows a finished job’s whole curve when opened again', async () => {
    await page.reload({ waitUntil: 'load' });
    await page.waitForSelector('#job-list li');
    await page.click('#job-list li');
    await page.waitForFunction(
      (steps) => Number(document.getElementById('loss-chart')!.dataset.points) === steps,
      {},
      STEPS,
    );
    expect(await page.$eval('#job-state', (e) => (e as HTMLElement).dataset.state)).toBe('completed');
  });

  it('streams a generation in the playground', { timeout: 180_000 }, async () => {
    await page.evaluate(() => {
      const set = (id: string, v: string) => ((document.getElementById(id) as HTMLInputElement).value = v);
      set('gen-prompt', 'the quick ');
      set('gen-temperature', '0');
      set('gen-max', '48');
    });
    await page.click('#gen-start');
    // the stream ends in `done`, or in a state the page reports with the service's message; one
    // that never ends fails with what the page and the service show of it
    try {
      await page.waitForFunction(
        () =>
          /^(done|error|failed|cancelled|stopped)/.test(
            document.getElementById('gen-output')!.dataset.state ?? '',
          ),
        { timeout: 110_000 },
      );
    } catch (e) {
      const shown = await page.$eval('#gen-output', (el) => ({ ...(el as HTMLElement).dataset }));
      const job = shown.jobId
        ? await (
            await fetch(`${base}/v1/jobs/${shown.jobId}`, { headers: { authorization: `Bearer ${KEY}` } })
          ).text()
        : 'no start event: the request had no answer';
      throw new Error(`the generation did not end: page ${JSON.stringify(shown)}; job ${job}`, { cause: e });
    }
    const state = await page.$eval('#gen-output', (e) => (e as HTMLElement).dataset.state);
    const errors = await page.$$eval('#errors li', (l) => l.map((e) => e.textContent));
    expect({ state, errors }).toMatchObject({ state: expect.stringMatching(/^done/), errors: [] });
    const out = await page.$eval('#gen-output', (e) => ({
      tokens: Number((e as HTMLElement).dataset.tokens),
      done: (e as HTMLElement).dataset.doneText,
      shown: e.querySelector('.generated')!.textContent,
    }));
    expect(out.tokens).toBe(48);
    expect(out.shown).toBe(out.done);
    expect(Number(await text('#gen-tps'))).toBeGreaterThan(0);
    expect(await text('#gen-ttft')).toMatch(/^\d+ ms$/);
    await page.screenshot({ path: path.join(ARTIFACTS, 'dashboard.png'), fullPage: true });
  });

  it('reports a generation stream that closes before its end', async () => {
    cutGenerations = true;
    try {
      await page.click('#gen-start');
      await page.waitForFunction(() => document.getElementById('gen-output')!.dataset.state === 'error', {
        timeout: 30_000,
      });
      const shown = await page.$eval('#gen-output', (e) => ({ ...(e as HTMLElement).dataset }));
      expect(shown).toMatchObject({ jobId: 'cut-short', tokens: '1' });
      const errors = await page.$$eval('#errors li', (l) => l.map((e) => e.textContent));
      expect(errors).toContainEqual(expect.stringContaining('the stream ended before the generation did'));
    } finally {
      cutGenerations = false;
    }
  });

  it('asked nothing of any other host', () => {
    expect(offsite).toEqual([]);
  });
});
