/**
 * Ceph RBD for sparsevirtd's storage: librados/librbd through koffi (`librbd.ts`), pools and
 * images in libvirt's terms (`pool.ts`), and the sparse streaming primitives (`stream.ts`).
 */
export { CEPH_PACKAGES, cephAvailable, setCephLibraryNames, RBD_FEATURE_LAYERING, RBD_FEATURE_EXCLUSIVE_LOCK, RBD_FEATURE_OBJECT_MAP, RBD_FEATURE_FAST_DIFF, RBD_FEATURE_DEEP_FLATTEN } from '../../io/librbd.js';
export type { DiffExtent, ClusterStat, PoolStat } from '../../io/librbd.js';
export { RbdPool, RbdImage, monHostString } from './pool.js';
export type { RbdMonitor, RbdPoolSource, RbdPoolStats, RbdVolumeInfo, RbdCreateOptions, RbdOpOptions } from './pool.js';
export { rbdReadChunks, rbdWriteChunks } from './stream.js';
export type { RbdReadOptions, RbdWriteOptions, RbdWriteResult } from './stream.js';
