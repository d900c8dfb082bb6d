import { ATTENTION_OPTION_CASES } from '../../scripts/parity/paths.js';
import { paritySuite } from '../parity/suite.js';

// Reference cases (x-transformers 2.0.1 on PyTorch, CPU, float32, eval) of multi-head latent attention
// (latent queries / key-values, rotary sub-heads, cached decoding), the hybrid GRU beside attention
// (folding, masks, bidirectional and stacked GRUs), qkvReceiveDiffResiduals with hyper-connections,
// relPosKwargs and residualFnKwargs: logits of the forward, the loss and every gradient of a training
// step, greedy tokens with and without the cache. test/fixtures/attention-options/generate.py writes them.
paritySuite(
  'Attention and AttentionLayers options: parity with x-transformers 2.0.1',
  ATTENTION_OPTION_CASES,
);
