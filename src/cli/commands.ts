/**
 * The commands sparsevirt understands: virsh 9.0's definitions (names, option order and types,
 * help texts) for the storage, host and help commands, plus a few marked extensions. Only
 * definitions live here, so parsing and help never load the client.
 */
import type { CmdDef, CmdGroup, OptDef } from './vsh.js';

const poolData = (help = 'pool name or uuid'): OptDef => ({ name: 'pool', type: 'data', required: true, help });
const poolOptional: OptDef = { name: 'pool', type: 'string', help: 'pool name or uuid' };
const volData = (help = 'vol name, key or path'): OptDef => ({ name: 'vol', type: 'data', required: true, help });
const json: OptDef = { name: 'json', type: 'bool', help: 'print JSON (sparsevirt extension)', extension: true };
const transferExtensions: OptDef[] = [
  { name: 'sparse-fallback', type: 'bool', help: 'if the server refuses --sparse, transfer without it (sparsevirt extension)', extension: true },
  { name: 'verbose', type: 'bool', help: 'print a summary line on stderr at the end (sparsevirt extension)', extension: true },
  json,
];
const noOverwrite: OptDef = { name: 'no-overwrite', type: 'bool', help: 'do not overwrite any existing data' };
const overwrite: OptDef = { name: 'overwrite', type: 'bool', help: 'overwrite any existing data' };
const xpath: OptDef[] = [
  { name: 'xpath', type: 'string', namedOnly: true, help: 'xpath expression to filter the XML document' },
  { name: 'wrap', type: 'bool', help: 'wrap xpath results in an common root element' },
];

const poolXAs = (s: string): OptDef => ({ name: s, type: 'string', help: '' });

export const HELP: CmdDef = {
  name: 'help',
  help: 'print help',
  desc: 'Prints global help, command specific help, or help for a\n    group of related commands',
  opts: [{ name: 'command', type: 'string', help: 'Prints global help, command specific help, or help for a group of related commands' }],
  noConnect: true,
};

export const GROUPS: CmdGroup[] = [
  {
    name: 'Host and Hypervisor',
    keyword: 'host',
    commands: [
      { name: 'hostname', help: 'print the hypervisor hostname', desc: '', opts: [json] },
      { name: 'uri', help: 'print the hypervisor canonical URI', desc: '', opts: [json] },
      {
        name: 'version', help: 'show version', desc: 'Display the system version information.',
        opts: [{ name: 'daemon', type: 'bool', help: 'report daemon version too' }, json],
      },
    ],
  },
  {
    name: 'Storage Pool',
    keyword: 'pool',
    commands: [
      {
        name: 'pool-autostart', help: 'autostart a pool', desc: 'Configure a pool to be automatically started at boot.',
        opts: [poolData(), { name: 'disable', type: 'bool', help: 'disable autostarting' }],
      },
      { name: 'pool-build', help: 'build a pool', desc: 'Build a given pool.', opts: [poolData(), noOverwrite, overwrite] },
      {
        name: 'pool-define-as', help: 'define a pool from a set of args', desc: 'Define a pool.',
        opts: [
          { name: 'name', type: 'data', required: true, help: 'name of the pool' },
          { name: 'type', type: 'data', required: true, help: 'type of the pool' },
          { name: 'print-xml', type: 'bool', help: "print XML document, but don't define/create" },
          { ...poolXAs('source-host'), help: 'source-host for underlying storage' },
          { ...poolXAs('source-path'), help: 'source path for underlying storage' },
          { ...poolXAs('source-dev'), help: 'source device for underlying storage' },
          { ...poolXAs('source-name'), help: 'source name for underlying storage' },
          { ...poolXAs('target'), help: 'target for underlying storage' },
          { ...poolXAs('source-format'), help: 'format for underlying storage' },
          { ...poolXAs('auth-type'), help: 'auth type to be used for underlying storage' },
          { ...poolXAs('auth-username'), help: 'auth username to be used for underlying storage' },
          { ...poolXAs('secret-usage'), help: 'auth secret usage to be used for underlying storage' },
          { ...poolXAs('secret-uuid'), help: 'auth secret UUID to be used for underlying storage' },
          { ...poolXAs('adapter-name'), help: 'adapter name to be used for underlying storage' },
          { ...poolXAs('adapter-wwnn'), help: 'adapter wwnn to be used for underlying storage' },
          { ...poolXAs('adapter-wwpn'), help: 'adapter wwpn to be used for underlying storage' },
          { ...poolXAs('adapter-parent'), help: 'adapter parent scsi_hostN to be used for underlying vHBA storage' },
          { ...poolXAs('adapter-parent-wwnn'), help: 'adapter parent scsi_hostN wwnn to be used for underlying vHBA storage' },
          { ...poolXAs('adapter-parent-wwpn'), help: 'adapter parent scsi_hostN wwpn to be used for underlying vHBA storage' },
          { ...poolXAs('adapter-parent-fabric-wwn'), help: 'adapter parent scsi_hostN fabric_wwn to be used for underlying vHBA storage' },
          { ...poolXAs('source-protocol-ver'), help: 'nfsvers value for NFS pool mount option' },
          { ...poolXAs('source-initiator'), help: 'initiator iqn for underlying storage' },
        ],
      },
      { name: 'pool-destroy', help: 'destroy (stop) a pool', desc: 'Forcefully stop a given pool. Raw data in the pool is untouched', opts: [poolData()] },
      {
        name: 'pool-dumpxml', help: 'pool information in XML', desc: 'Output the pool information as an XML dump to stdout.',
        opts: [poolData(), { name: 'inactive', type: 'bool', help: 'show inactive defined XML' }, ...xpath],
      },
      {
        name: 'pool-info', help: 'storage pool information', desc: 'Returns basic information about the storage pool.',
        opts: [poolData(), { name: 'bytes', type: 'bool', help: 'Return pool info in bytes' }, json],
      },
      {
        name: 'pool-list', help: 'list pools', desc: 'Returns list of pools.',
        opts: [
          { name: 'inactive', type: 'bool', help: 'list inactive pools' },
          { name: 'all', type: 'bool', help: 'list inactive & active pools' },
          { name: 'transient', type: 'bool', help: 'list transient pools' },
          { name: 'persistent', type: 'bool', help: 'list persistent pools' },
          { name: 'autostart', type: 'bool', help: 'list pools with autostart enabled' },
          { name: 'no-autostart', type: 'bool', help: 'list pools with autostart disabled' },
          { name: 'type', type: 'string', help: 'only list pool of specified type(s) (if supported)' },
          { name: 'details', type: 'bool', help: 'display extended details for pools' },
          { name: 'uuid', type: 'bool', help: 'list UUID of active pools only' },
          { name: 'name', type: 'bool', help: 'list name of active pools only' },
          json,
        ],
      },
      { name: 'pool-refresh', help: 'refresh a pool', desc: 'Refresh a given pool.', opts: [poolData()] },
      {
        name: 'pool-start', help: 'start a (previously defined) inactive pool', desc: 'Start a pool.',
        opts: [poolData(), { name: 'build', type: 'bool', help: 'build the pool as normal' }, noOverwrite, overwrite],
      },
      { name: 'pool-undefine', help: 'undefine an inactive pool', desc: 'Undefine the configuration for an inactive pool.', opts: [poolData()] },
    ],
  },
  {
    name: 'Storage Volume',
    keyword: 'volume',
    commands: [
      {
        name: 'vol-create-as', help: 'create a volume from a set of args', desc: 'Create a vol.',
        opts: [
          poolData('pool name'),
          { name: 'name', type: 'data', required: true, help: 'name of the volume' },
          { name: 'capacity', type: 'data', required: true, help: 'size of the vol, as scaled integer (default bytes)' },
          { name: 'allocation', type: 'string', help: 'initial allocation size, as scaled integer (default bytes)' },
          { name: 'format', type: 'string', help: 'file format type raw,bochs,qcow,qcow2,qed,vmdk' },
          { name: 'backing-vol', type: 'string', help: 'the backing volume if taking a snapshot' },
          { name: 'backing-vol-format', type: 'string', help: 'format of backing volume if taking a snapshot' },
          { name: 'prealloc-metadata', type: 'bool', help: 'preallocate metadata (for qcow2 instead of full allocation)' },
          { name: 'print-xml', type: 'bool', help: "print XML document, but don't define/create" },
          json,
        ],
      },
      {
        name: 'vol-delete', help: 'delete a vol', desc: 'Delete a given vol.',
        opts: [volData(), poolOptional, { name: 'delete-snapshots', type: 'bool', help: 'delete snapshots associated with volume (must be supported by storage driver)' }],
      },
      {
        name: 'vol-download', help: 'download volume contents to a file', desc: 'Download volume contents to a file',
        opts: [
          volData(),
          { name: 'file', type: 'data', required: true, help: 'file' },
          poolOptional,
          { name: 'offset', type: 'int', help: 'volume offset to download from' },
          { name: 'length', type: 'int', help: 'amount of data to download' },
          { name: 'sparse', type: 'bool', help: 'preserve sparseness of volume' },
          ...transferExtensions,
        ],
      },
      {
        name: 'vol-dumpxml', help: 'vol information in XML', desc: 'Output the vol information as an XML dump to stdout.',
        opts: [volData(), poolOptional, ...xpath],
      },
      {
        name: 'vol-info', help: 'storage vol information', desc: 'Returns basic information about the storage vol.',
        opts: [
          volData(),
          poolOptional,
          { name: 'bytes', type: 'bool', help: 'sizes are represented in bytes rather than pretty units' },
          { name: 'physical', type: 'bool', help: 'return the physical size of the volume in allocation field' },
          json,
        ],
      },
      { name: 'vol-key', help: 'returns the volume key for a given volume name or path', desc: '', opts: [volData('volume name or path'), poolOptional, json] },
      {
        name: 'vol-list', help: 'list vols', desc: 'Returns list of vols by pool.',
        opts: [poolData(), { name: 'details', type: 'bool', help: 'display extended details for volumes' }, json],
      },
      { name: 'vol-path', help: 'returns the volume path for a given volume name or key', desc: '', opts: [volData('volume name or key'), poolOptional, json] },
      {
        name: 'vol-resize', help: 'resize a vol',
        desc: 'Resizes a storage volume. This is safe only for storage volumes not in use by an active guest.\nSee blockresize for live resizing.',
        opts: [
          volData(),
          { name: 'capacity', type: 'data', required: true, help: 'new capacity for the vol, as scaled integer (default bytes)' },
          poolOptional,
          { name: 'allocate', type: 'bool', help: 'allocate the new capacity, rather than leaving it sparse' },
          { name: 'delta', type: 'bool', help: 'use capacity as a delta to current size, rather than the new size' },
          { name: 'shrink', type: 'bool', help: 'allow the resize to shrink the volume' },
        ],
      },
      {
        name: 'vol-upload', help: 'upload file contents to a volume', desc: 'Upload file contents to a volume',
        opts: [
          volData(),
          { name: 'file', type: 'data', required: true, help: 'file' },
          poolOptional,
          { name: 'offset', type: 'int', help: 'volume offset to upload to' },
          { name: 'length', type: 'int', help: 'amount of data to upload' },
          { name: 'sparse', type: 'bool', help: 'preserve sparseness of volume' },
          ...transferExtensions,
        ],
      },
      {
        name: 'vol-wipe', help: 'wipe a vol', desc: 'Ensure data previously on a volume is not accessible to future reads',
        opts: [volData(), poolOptional, { name: 'algorithm', type: 'string', help: 'perform selected wiping algorithm' }],
      },
      {
        name: 'vol-copy', help: 'copy a volume to another host (sparsevirt extension)',
        desc: 'Copy volume contents straight to a volume of another connection, holes kept, optionally verified.',
        opts: [
          volData(),
          { name: 'desturi', type: 'string', required: true, namedOnly: true, help: 'connection URI of the destination host' },
          poolOptional,
          { name: 'dest-pool', type: 'string', help: 'destination pool (default: the source\'s pool name)' },
          { name: 'dest-vol', type: 'string', help: 'destination volume (default: the source\'s name)' },
          { name: 'create', type: 'bool', help: 'create the destination volume (same capacity and format, allocation 0) if it does not exist' },
          { name: 'offset', type: 'int', help: 'offset to copy from (the same in both volumes)' },
          { name: 'length', type: 'int', help: 'amount of data to copy' },
          { name: 'sparse', type: 'bool', help: 'preserve sparseness of volume' },
          { name: 'verify', type: 'bool', help: 'compare the content digests of source and destination afterwards' },
          { name: 'verbose', type: 'bool', help: 'print a summary line on stderr at the end' },
          json,
        ],
      },
    ],
  },
  {
    name: 'Virsh itself',
    keyword: 'virsh',
    commands: [
      { name: 'exit', help: 'quit this interactive terminal', desc: '', opts: [], noConnect: true },
      HELP,
      { name: 'quit', help: 'quit this interactive terminal', desc: '', opts: [], noConnect: true },
    ],
  },
];

const BY_NAME = new Map<string, CmdDef>();
for (const g of GROUPS) for (const c of g.commands) BY_NAME.set(c.name, c);

export function findCommand(name: string): CmdDef | null {
  return BY_NAME.get(name) ?? null;
}

export function findGroup(name: string): CmdGroup | null {
  return GROUPS.find((g) => g.name === name || g.keyword === name) ?? null;
}
