import { register } from 'node:module';
register('./esm-resolve-hook.mjs', import.meta.url);
