export * from './remote.js';
