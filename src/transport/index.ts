export * from './uri.js';
export * from './connect.js';
