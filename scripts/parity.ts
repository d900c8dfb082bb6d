/**
 * Parity runner: `npm run parity -- [DIR|FILE ...]` runs every `*.safetensors` case (sorted) against
 * the reference outputs it holds, prints one line per case and ends with `parity: N passed, M failed`.
 * Without arguments it runs the repository's reference cases (test/fixtures/parity,
 * test/fixtures/extra-parity, test/fixtures/wrapper-options, test/fixtures/attention-options and
 * test/fixtures/reference-modules). Exits non-zero when a case failed or no case was found. The
 * backend follows XT_BACKEND.
 */
import { statSync } from 'node:fs';
import { initBackend } from '../src/backend/index.js';
import { ensureGradients } from '../src/train/gradients.js';
import { formatResult, listCases, runCase } from './parity/run.js';
import {
  ATTENTION_OPTION_CASES,
  EXTRA_PARITY_CASES,
  PARITY_CASES,
  REFERENCE_MODULE_CASES,
  WRAPPER_OPTION_CASES,
} from './parity/paths.js';

async function main(): Promise<number> {
  const given = process.argv.slice(2).filter((a) => a !== '--');
  const args = given.length
    ? given
    : [
        PARITY_CASES,
        EXTRA_PARITY_CASES,
        WRAPPER_OPTION_CASES,
        ATTENTION_OPTION_CASES,
        REFERENCE_MODULE_CASES,
      ];
  await initBackend(process.env.XT_BACKEND);
  // gradients (loss_grads) and the modules that import them need TF.js's gradient registry
  await ensureGradients();
  const files: string[] = [];
  for (const a of args) {
    if (statSync(a, { throwIfNoEntry: false })?.isFile()) files.push(a);
    else {
      try {
        files.push(...listCases(a));
      } catch (e) {
        console.error((e as Error).message);
      }
    }
  }
  let passed = 0;
  let failed = 0;
  for (const f of files) {
    const r = await runCase(f);
    if (r.ok) passed++;
    else failed++;
    console.log(formatResult(r));
  }
  if (files.length === 0) console.error(`parity: no *.safetensors cases in ${args.join(', ')}`);
  console.log(`parity: ${passed} passed, ${failed} failed`);
  return failed > 0 || files.length === 0 ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    console.error(e);
    console.log('parity: 0 passed, 0 failed');
    process.exit(1);
  },
);
