import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { paritySuite } from './parity/suite.js';

// More reference cases (x-transformers 2.0.1 on PyTorch, CPU, float32, eval), in the format of the
// visible set, on smaller models (dim 16, vocabulary 24): the fused attention path with masks, memory
// key/values, ALiBi and grouped heads; greedy generation with and without the cache for every
// attention-side positional scheme; Transformer-XL with short memories, memory tokens and uneven
// segments; gradients; and wrapper options the visible set does not combine. One test per case.
const here = path.dirname(fileURLToPath(import.meta.url));
paritySuite('parity with x-transformers 2.0.1 (extra cases)', path.resolve(here, 'fixtures', 'extra-parity'));
