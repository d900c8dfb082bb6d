import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

/** The reference cases (test/fixtures/parity) of the parity specification (x-transformers 2.0.1), kept in the repository. */
export const PARITY_CASES = path.resolve(here, '..', '..', 'test', 'fixtures', 'parity');

/** Extra reference cases (test/fixtures/extra-parity) for options the specification's cases do not combine. */
export const EXTRA_PARITY_CASES = path.resolve(here, '..', '..', 'test', 'fixtures', 'extra-parity');

/** Reference cases (test/fixtures/wrapper-options) of TransformerWrapper's output, embedding and recycling options. */
export const WRAPPER_OPTION_CASES = path.resolve(here, '..', '..', 'test', 'fixtures', 'wrapper-options');

/** Reference cases (test/fixtures/reference-modules) of NeoMLP, MultiInputTransformerWrapper, DPO and NonAutoregressiveWrapper. */
export const REFERENCE_MODULE_CASES = path.resolve(here, '..', '..', 'test', 'fixtures', 'reference-modules');

/** Reference cases (test/fixtures/attention-options) of Attention's and AttentionLayers' remaining options. */
export const ATTENTION_OPTION_CASES = path.resolve(here, '..', '..', 'test', 'fixtures', 'attention-options');
