export * from './remote.js';
export * from './secret.js';
