/**
 * Image formats for the dir pool backend: probing (libvirt 9.0's rules), backing chains, the
 * volume XML libvirtd gives for such files, and qemu-img for what libvirtd uses it for.
 */
export * from './probe.js';
export * from './chain.js';
export * from './volxml.js';
export * from './qemu-img.js';
