import { backendInfo } from '../../src/backend/index.js';
import { batchDecoderCases } from './batch-decoder.cases.js';

batchDecoderCases(backendInfo()?.backend ?? 'unknown');
