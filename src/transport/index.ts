export * from './uri.js';
export * from './connect.js';
export * from './ssh.js';
