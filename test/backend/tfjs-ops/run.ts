/**
 * Runs TensorFlow.js's own op test suite (the *_test.js files shipped in @tensorflow/tfjs-core's
 * package, written for jasmine) against the `torch` backend.
 *   npm run test:tfjs-ops [-- --filter <substring>] [--files ops/add_test.js,...] [--list-failures]
 * Prints passed / failed / excluded counts; exit status 1 when a spec fails.
 */
import { register } from 'node:module';

register('./hook.mjs', import.meta.url);

const { default: Jasmine } = await import('jasmine');
const path = await import('node:path');
const { createRequire } = await import('node:module');
const { EXCLUSIONS } = await import('./exclusions.js');

const args = process.argv.slice(2);
const opt = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};

process.env.XT_QUIET_FALLBACK ??= '1';
// the ES module build of tfjs-core calls require('util') on node
// (and jasmine_util requires a jasmine-core file that the package's exports map hides)
const req = createRequire(import.meta.url);
const jasmineCoreFile = path.join(path.dirname(req.resolve('jasmine-core')), 'jasmine-core', 'jasmine.js');
(globalThis as { require?: (id: string) => unknown }).require = (id: string) =>
  req(id === 'jasmine-core/lib/jasmine-core/jasmine.js' ? jasmineCoreFile : id);
await import('@tensorflow/tfjs-core');
await import('@tensorflow/tfjs-core/dist/register_all_gradients.js');
await import('@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops.js');
const ju = (await import('@tensorflow/tfjs-core/dist/jasmine_util.js')) as {
  setTestEnvs: (
    envs: Array<{ name: string; backendName: string; flags: object; isDataSync: boolean }>,
  ) => void;
};
const { registerTorchBackend } = await import('../../../src/backend/torch/register.js');
const reg = registerTorchBackend();
if (!reg.ok) {
  console.error(reg.reason);
  process.exit(1);
}
ju.setTestEnvs([{ name: 'torch', backendName: 'torch', flags: {}, isDataSync: true }]);

const coreDir = path.dirname(createRequire(import.meta.url).resolve('@tensorflow/tfjs-core/package.json'));
const runner = new Jasmine({ projectBaseDir: path.join(coreDir, 'dist') });
runner.exitOnCompletion = false;
const files = opt('--files')?.split(',') ?? ['ops/*_test.js', 'gradients_test.js', 'tensor_test.js'];
await runner.loadConfig({
  spec_dir: '.',
  spec_files: files,
  jsLoader: 'import',
  random: false,
});

const filter = opt('--filter');
const excluded = new Map<string, number>();
runner.env.configure({
  specFilter: (spec: { getFullName(): string }) => {
    const name = spec.getFullName();
    if (filter && !name.includes(filter)) return false;
    const ex = EXCLUSIONS.find((e) => name.includes(e.match));
    if (ex) {
      excluded.set(ex.match, (excluded.get(ex.match) ?? 0) + 1);
      return false;
    }
    return true;
  },
});

let passed = 0;
let failed = 0;
let skipped = 0;
const failures: string[] = [];
runner.clearReporters();
const trace = args.includes('--trace');
runner.addReporter({
  specStarted: (r: { fullName: string }) => {
    if (trace) process.stderr.write(`START ${r.fullName}\n`);
  },
  specDone: (r: { status: string; fullName: string; failedExpectations: Array<{ message: string }> }) => {
    if (r.status === 'passed') passed++;
    else if (r.status === 'failed') {
      failed++;
      failures.push(
        `${r.fullName}\n    ${r.failedExpectations.map((f) => f.message.split('\n')[0]).join('\n    ')}`,
      );
    } else skipped++;
    const n = passed + failed;
    if (n % 500 === 0) process.stderr.write(`tfjs-ops: ${n} specs run (${failed} failed)\n`);
  },
});
await runner.execute();
const excludedCount = [...excluded.values()].reduce((a, b) => a + b, 0);
if (args.includes('--list-failures') || failed <= 50) for (const f of failures) console.log(`FAILED ${f}`);
console.log(
  JSON.stringify({
    passed,
    failed,
    excluded: excludedCount,
    notRun: skipped,
    byExclusion: Object.fromEntries(excluded),
  }),
);
process.exit(failed > 0 ? 1 : 0);
