import { EXTRA_PARITY_CASES } from '../scripts/parity/paths.js';
import { paritySuite } from './parity/suite.js';

// More reference cases (x-transformers 2.0.1 on PyTorch, CPU, float32, eval), in the format of the
// specification's cases, on smaller models (dim 16, vocabulary 24): the fused attention path with
// masks, memory key/values, ALiBi and grouped heads; greedy generation with and without the cache for
// every attention-side positional scheme; Transformer-XL with short memories, memory tokens and uneven
// segments; gradients; and wrapper options the specification's cases do not combine. One test per
// case; test/fixtures/extra-parity/generate.py writes them.
paritySuite('parity with x-transformers 2.0.1 (extra cases)', EXTRA_PARITY_CASES);
