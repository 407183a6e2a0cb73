/**
 * The syntax of libvirt's configuration files (libvirtd.conf; libvirt's virconf.c), which
 * sparsevirtd.conf shares:
 *
 *     # a comment
 *     name = 1                      integers (a sign allowed)
 *     name = "text"                 strings in double or single quotes, on one line, no escapes
 *     name = """two
 *     lines"""                      or in triple double quotes, over several lines
 *     name = [ "a", "b",            lists, over several lines, a trailing comma allowed,
 *              "c" ]  # comment     comments after a value and between list items
 *     a = 1; b = 2                  `;` separates statements on one line
 *
 * Names start with a letter and go on with letters, digits and `_`. Sans-I/O: `parseConf(text,
 * file)` returns the entries with their line numbers, or throws a `ConfigError` whose message is
 * `FILE:LINE: reason`.
 */
import { SparsevirtError } from '../errors.js';

export type ConfValue =
  | { type: 'int'; value: number; line: number }
  | { type: 'string'; value: string; line: number }
  | { type: 'list'; items: ConfValue[]; line: number };

export interface ConfEntry {
  name: string;
  value: ConfValue;
  line: number;
}

/** A configuration the daemon refuses; `code` ERR_CONFIG, message `FILE:LINE: reason` (or `FILE: reason`). */
export class ConfigError extends SparsevirtError {
  constructor(
    readonly file: string,
    readonly line: number | null,
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super('ERR_CONFIG', line === null ? `${file}: ${reason}` : `${file}:${line}: ${reason}`, options);
    this.name = 'ConfigError';
  }
}

const isBlank = (c: string | undefined) => c === ' ' || c === '\t';
const isEol = (c: string | undefined) => c === '\n' || c === '\r';
const isDigit = (c: string | undefined) => c !== undefined && c >= '0' && c <= '9';
const isAlpha = (c: string | undefined) => c !== undefined && /^[A-Za-z]$/.test(c);
const isNameChar = (c: string | undefined) => c !== undefined && /^[A-Za-z0-9_]$/.test(c);

export function parseConf(text: string, file: string): ConfEntry[] {
  return new ConfParser(text, file).parse();
}

class ConfParser {
  private p = 0;
  private line = 1;
  constructor(
    private readonly s: string,
    private readonly file: string,
  ) {}

  private fail(reason: string, line = this.line): never {
    throw new ConfigError(this.file, line, reason);
  }

  private get cur(): string | undefined {
    return this.s[this.p];
  }

  private skipBlanks(): void {
    while (isBlank(this.cur)) this.p++;
  }

  /** Blanks, newlines and (inside lists) comments. */
  private skipBlanksEolComments(): void {
    for (;;) {
      const c = this.cur;
      if (isBlank(c) || c === '\r') this.p++;
      else if (c === '\n') {
        this.p++;
        this.line++;
      } else if (c === '#') this.skipComment();
      else return;
    }
  }

  private skipComment(): void {
    while (this.p < this.s.length && this.cur !== '\n') this.p++;
  }

  parse(): ConfEntry[] {
    const entries: ConfEntry[] = [];
    for (;;) {
      this.skipBlanksEolComments();
      if (this.p >= this.s.length) return entries;
      const line = this.line;
      const name = this.name();
      this.skipBlanks();
      if (this.cur !== '=') this.fail(`expecting '=' after '${name}'`);
      this.p++;
      this.skipBlanks();
      const value = this.value();
      entries.push({ name, value, line });
      this.separator();
    }
  }

  private name(): string {
    if (!isAlpha(this.cur)) {
      const c = this.cur;
      this.fail(c === '=' ? 'expecting a name before \'=\'' : `expecting a name, found '${printable(c)}'`);
    }
    const start = this.p;
    while (isNameChar(this.cur)) this.p++;
    return this.s.slice(start, this.p);
  }

  /** After a statement: blanks, an optional comment, then the end of the line, `;` or the end of the file. */
  private separator(): void {
    this.skipBlanks();
    if (this.cur === '#') this.skipComment();
    if (this.p >= this.s.length) return;
    if (isEol(this.cur)) return;
    if (this.cur === ';') {
      this.p++;
      return;
    }
    this.fail(`expecting the end of the line after the value, found '${printable(this.cur)}'`);
  }

  private value(): ConfValue {
    const line = this.line;
    const c = this.cur;
    if (this.p >= this.s.length || isEol(c)) this.fail('expecting a value');
    if (c === '"' || c === "'") return { type: 'string', value: this.string(), line };
    if (c === '[') return { type: 'list', items: this.list(), line };
    if (isDigit(c) || c === '-' || c === '+') return { type: 'int', value: this.integer(), line };
    return this.fail(`expecting a value (a number, a "string" or a [ list ]), found '${printable(c)}'`);
  }

  private integer(): number {
    const start = this.p;
    if (this.cur === '-' || this.cur === '+') this.p++;
    if (!isDigit(this.cur)) this.fail('unterminated number');
    while (isDigit(this.cur)) this.p++;
    if (isNameChar(this.cur) || this.cur === '.') this.fail(`'${this.s.slice(start, this.p)}${printable(this.cur)}…' is not an integer (strings take quotes)`);
    const n = Number(this.s.slice(start, this.p));
    if (!Number.isSafeInteger(n)) this.fail(`${this.s.slice(start, this.p)} is out of range`);
    return n;
  }

  private string(): string {
    const startLine = this.line;
    if (this.s.startsWith('"""', this.p)) {
      const end = this.s.indexOf('"""', this.p + 3);
      if (end < 0) this.fail('unterminated string (""" not closed)', startLine);
      const v = this.s.slice(this.p + 3, end);
      for (const ch of v) if (ch === '\n') this.line++;
      this.p = end + 3;
      return v;
    }
    const q = this.cur!;
    this.p++;
    const start = this.p;
    while (this.p < this.s.length && this.cur !== q && !isEol(this.cur)) this.p++;
    if (this.cur !== q) this.fail(`unterminated string (${q} not closed on its line)`, startLine);
    const v = this.s.slice(start, this.p);
    this.p++;
    return v;
  }

  private list(): ConfValue[] {
    const startLine = this.line;
    this.p++; // [
    const items: ConfValue[] = [];
    this.skipBlanksEolComments();
    while (this.cur !== ']') {
      if (this.p >= this.s.length) this.fail('list is not closed with ]', startLine);
      if (items.length > 0) {
        if (this.cur !== ',') this.fail(`expecting ',' or ']' in the list, found '${printable(this.cur)}'`);
        this.p++;
        this.skipBlanksEolComments();
        if (this.s[this.p] === ']') break;
        if (this.p >= this.s.length) this.fail('list is not closed with ]', startLine);
      }
      items.push(this.value());
      this.skipBlanksEolComments();
    }
    this.p++; // ]
    return items;
  }
}

function printable(c: string | undefined): string {
  if (c === undefined) return 'end of file';
  if (c === '\n' || c === '\r') return 'end of line';
  return c;
}
