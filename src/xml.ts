/**
 * Text for XML documents, as libvirt writes it (virBufferEscapeString): the five markup characters
 * as entities, and the control characters XML 1.0 cannot hold dropped. One escaper for the client,
 * the CLI and the daemon.
 */
export function escapeXml(s: string): string {
  return s
    .replace(/[\x00-\x08\x0b\x0c\x0e-\x1f]/g, '')
    .replace(/[&<>'"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', "'": '&apos;', '"': '&quot;' })[c]!);
}
