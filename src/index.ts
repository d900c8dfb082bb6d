/**
 * x-transformers for TypeScript: the library's public API.
 */
export { initBackend, backendInfo, BACKENDS } from './backend/index.js';
export type { BackendName, BackendInfo } from './backend/index.js';
export { Module, ModuleList } from './nn/module.js';
export type { LoadStateDictOptions, LoadStateDictResult } from './nn/module.js';
export { Rng, manualSeed, getRng } from './utils/random.js';
export { parseSafetensors, loadSafetensors, saveSafetensors, rawToTensor } from './io/safetensors.js';
export type { SafetensorsDtype, RawTensor, SafetensorsFile } from './io/safetensors.js';
export * from './attention/index.js';
