import { WRAPPER_OPTION_CASES } from '../../scripts/parity/paths.js';
import { paritySuite } from '../parity/suite.js';

// Reference cases (x-transformers 2.0.1 on PyTorch, CPU, float32, eval) of TransformerWrapper's
// embedNumTokens, numOutputHeads, mixtureOfSoftmax, memoryTokensInterspersedEvery, recycling and the
// attention z-loss: logits and z-loss of the forward, the loss and every gradient of a training step.
// test/fixtures/wrapper-options/generate.py writes them.
paritySuite('TransformerWrapper options: parity with x-transformers 2.0.1', WRAPPER_OPTION_CASES);
