/**
 * The pool backends sparsevirtd has, registered with the driver (one line per backend).
 */
import { registerBackend } from '../backend.js';
import { dirBackend } from './dir.js';
import { rbdBackend } from './rbd.js';

registerBackend(dirBackend);
registerBackend(rbdBackend);
