/**
 * The document model of the man pages (sparsevirt(1) from the CLI's tables, sparsevirtd(8) and
 * sparsevirtd.conf(5) from the daemon's); scripts/gen-docs.mjs writes it as roff. Inline markup
 * in texts: `**bold**` and `__italic__`.
 */
export interface ManItem {
  term: string;
  text: string;
  items?: ManItem[];
}

export type ManBlock = { para: string } | { items: ManItem[] } | { pre: string } | { sub: string };

export interface ManPage {
  name: string;
  section: number;
  /** The NAME line's description. */
  title: string;
  /** The footer's source, e.g. `sparsevirt 0.1.0`. */
  source: string;
  manual: string;
  sections: Array<{ heading: string; blocks: ManBlock[] }>;
}
