import { initBackend } from '../src/backend/index.js';

// Every test file runs on the backend XT_BACKEND names, else the first that loads.
await initBackend(process.env.XT_BACKEND, () => {});
