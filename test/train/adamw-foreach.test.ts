import { adamwCases } from './adamw-cases.js';

// The multi-tensor (foreach) update that parameters on a GPU take, run here on the CPU: the
// addon reads XT_ADAMW_FOREACH when it first updates parameters, which no test file in this
// process has done yet (each test file runs in its own process).
process.env.XT_ADAMW_FOREACH = '1';

adamwCases('AdamW update, multi-tensor path');
