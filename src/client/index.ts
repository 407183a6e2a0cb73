export * from './connection.js';
export * from './storage.js';
