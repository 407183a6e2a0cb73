/** The client's public surface: `connect`, the connection, pools and volumes, and their option and result types. */
export { connect, Connection, type ConnectOptions } from './connection.js';
export {
  StoragePool, StorageVol,
  type PoolInfo, type VolInfo, type TransferOptions, type FileTransferOptions, type TransferResult,
} from './storage.js';
export {
  copyVolume, compareVolumes, volumeDigest,
  type CopyOptions, type CopyProgress, type CopyResult,
} from './copy.js';
