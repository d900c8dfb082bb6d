import { initBackend } from '../../src/backend/index.js';
import { batchDecoderCases } from './batch-decoder.cases.js';

// the same cases on the pure-JavaScript cpu backend
await initBackend('cpu', () => {});
batchDecoderCases('cpu');
