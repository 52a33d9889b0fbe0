/**
 * LVM2's text metadata format (what `vgcfgbackup` writes and what sits in a PV's metadata area):
 *
 *   vg0 {                      # a section: name { ... }
 *     extent_size = 8192       # key = value: integers, "strings", [ lists ]
 *     status = ["RESIZEABLE", "READ", "WRITE"]
 *     logical_volumes { root { segment1 { stripes = ["pv0", 0] } } }
 *   }
 *
 * The text comes from a guest disk, so it is untrusted: every failure is an Ext4Error naming the
 * line, depth and sizes are bounded, and numbers outside the safe-integer range are refused
 * rather than rounded (an offset that silently loses bits would map the wrong bytes).
 */
import { lvmCorrupt } from './errors.js';

export type ConfigScalar = string | number;
export type ConfigValue = ConfigScalar | ConfigScalar[];

export interface ConfigSection {
  readonly kind: 'section';
  /** Entries in file order. */
  readonly entries: ReadonlyArray<readonly [string, ConfigValue | ConfigSection]>;
}

/** Deeper nesting than this is not LVM metadata (a VG's is 4 levels deep). */
const MAX_DEPTH = 16;
/** The metadata area is at most a few MiB; anything larger is not metadata. */
export const MAX_METADATA_BYTES = 16 * 1024 * 1024;
const MAX_LIST = 1_000_000;

const NAME = /[A-Za-z0-9_.+\-]/;

export function isSection(value: ConfigValue | ConfigSection | undefined): value is ConfigSection {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

class Parser {
  private at = 0;
  private line = 1;

  constructor(private readonly text: string) {}

  private fail(message: string): never {
    throw lvmCorrupt(`text metadata line ${this.line}: ${message}`);
  }

  /** Skip whitespace and # comments. */
  private skip(): void {
    const { text } = this;
    while (this.at < text.length) {
      const c = text[this.at]!;
      if (c === '\n') {
        this.line += 1;
        this.at += 1;
      } else if (c === ' ' || c === '\t' || c === '\r') {
        this.at += 1;
      } else if (c === '#') {
        while (this.at < text.length && text[this.at] !== '\n') this.at += 1;
      } else {
        return;
      }
    }
  }

  private name(): string {
    const start = this.at;
    while (this.at < this.text.length && NAME.test(this.text[this.at]!)) this.at += 1;
    if (this.at === start) {
      const c = this.text[this.at];
      this.fail(c === undefined ? 'unexpected end of text' : `unexpected character ${JSON.stringify(c)}`);
    }
    return this.text.slice(start, this.at);
  }

  private string(): string {
    this.at += 1; // opening quote
    let out = '';
    for (;;) {
      if (this.at >= this.text.length) this.fail('unterminated string');
      const c = this.text[this.at]!;
      this.at += 1;
      if (c === '"') return out;
      if (c === '\n') this.line += 1;
      if (c === '\\') {
        if (this.at >= this.text.length) this.fail('unterminated string');
        out += this.text[this.at]!;
        this.at += 1;
      } else {
        out += c;
      }
    }
  }

  private number(): number {
    const match = /^-?[0-9]+(\.[0-9]+)?/.exec(this.text.slice(this.at, this.at + 40));
    if (!match) this.fail('expected a number');
    this.at += match[0].length;
    const value = Number(match[0]);
    if (match[1] === undefined && !Number.isSafeInteger(value)) this.fail(`number ${match[0]} is too large`);
    return value;
  }

  private scalar(): ConfigScalar {
    const c = this.text[this.at];
    if (c === '"') return this.string();
    if (c !== undefined && /[-0-9]/.test(c)) return this.number();
    return this.fail(c === undefined ? 'unexpected end of text, expected a value' : `expected a value, found ${JSON.stringify(c)}`);
  }

  private value(): ConfigValue {
    if (this.text[this.at] !== '[') return this.scalar();
    this.at += 1;
    const list: ConfigScalar[] = [];
    this.skip();
    if (this.text[this.at] === ']') {
      this.at += 1;
      return list;
    }
    for (;;) {
      this.skip();
      list.push(this.scalar());
      if (list.length > MAX_LIST) this.fail('list is too long');
      this.skip();
      const c = this.text[this.at];
      this.at += 1;
      if (c === ']') return list;
      if (c !== ',') this.fail(c === undefined ? 'unterminated list' : `expected "," or "]" in a list, found ${JSON.stringify(c)}`);
    }
  }

  /** Entries up to "}" (depth > 0) or the end of text (depth 0). */
  section(depth: number): ConfigSection {
    if (depth > MAX_DEPTH) this.fail('sections are nested too deeply');
    const entries: Array<readonly [string, ConfigValue | ConfigSection]> = [];
    const seen = new Set<string>();
    for (;;) {
      this.skip();
      const c = this.text[this.at];
      if (c === undefined || c === '\0') {
        if (depth > 0) this.fail('unexpected end of text inside a section');
        return { kind: 'section', entries };
      }
      if (c === '}') {
        if (depth === 0) this.fail('unexpected "}"');
        this.at += 1;
        return { kind: 'section', entries };
      }
      const key = this.name();
      if (seen.has(key)) this.fail(`"${key}" appears twice in one section`);
      seen.add(key);
      this.skip();
      const next = this.text[this.at];
      if (next === '{') {
        this.at += 1;
        entries.push([key, this.section(depth + 1)]);
      } else if (next === '=') {
        this.at += 1;
        this.skip();
        entries.push([key, this.value()]);
      } else {
        this.fail(`expected "=" or "{" after "${key}"`);
      }
    }
  }
}

/** Parse LVM text metadata. The text may end with NULs (the on-disk copy is NUL-terminated). */
export function parseMetadataText(text: string): ConfigSection {
  if (text.length > MAX_METADATA_BYTES) throw lvmCorrupt(`text metadata of ${text.length} bytes is larger than ${MAX_METADATA_BYTES}`);
  return new Parser(text).section(0);
}

/** Typed accessors that name the missing or mistyped key. */
export function child(section: ConfigSection, key: string): ConfigValue | ConfigSection | undefined {
  return section.entries.find(([k]) => k === key)?.[1];
}

export function getSection(section: ConfigSection, key: string, where: string): ConfigSection {
  const value = child(section, key);
  if (!isSection(value)) throw lvmCorrupt(`${where}: "${key}" is ${value === undefined ? 'missing' : 'not a section'}`);
  return value;
}

export function getInt(section: ConfigSection, key: string, where: string, min = 0): number {
  const value = child(section, key);
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < min) {
    throw lvmCorrupt(`${where}: "${key}" is ${value === undefined ? 'missing' : `not an integer >= ${min}`}`);
  }
  return value;
}

export function getString(section: ConfigSection, key: string, where: string): string {
  const value = child(section, key);
  if (typeof value !== 'string') throw lvmCorrupt(`${where}: "${key}" is ${value === undefined ? 'missing' : 'not a string'}`);
  return value;
}

export function getStringList(section: ConfigSection, key: string, where: string): string[] {
  const value = child(section, key);
  if (value === undefined) return [];
  if (!Array.isArray(value) || !value.every((v) => typeof v === 'string')) throw lvmCorrupt(`${where}: "${key}" is not a list of strings`);
  return value as string[];
}

export function subsections(section: ConfigSection): Array<[string, ConfigSection]> {
  return section.entries.filter((e): e is [string, ConfigSection] => isSection(e[1]));
}
