/** Plain-text tables (valid Markdown, aligned for the terminal) and number formats for reports. */

/** A Markdown table with padded columns; columns after the first are right-aligned unless `left` lists them. */
export function markdownTable(headers: readonly string[], rows: readonly (readonly string[])[], left: readonly number[] = [0]): string {
  const widths = headers.map((h, c) => Math.max(h.length, 3, ...rows.map((r) => (r[c] ?? '').length)));
  const isLeft = (c: number) => left.includes(c);
  const cell = (s: string, c: number) => (isLeft(c) ? s.padEnd(widths[c]!) : s.padStart(widths[c]!));
  const line = (r: readonly string[]) => `| ${headers.map((_, c) => cell(r[c] ?? '', c)).join(' | ')} |`;
  const rule = `|${widths.map((w, c) => (isLeft(c) ? `:${'-'.repeat(w + 1)}` : `${'-'.repeat(w + 1)}:`)).join('|')}|`;
  return [line(headers), rule, ...rows.map(line)].join('\n');
}

/** A number with `digits` decimals, or '–' when it is not finite. */
export function fixed(v: number | undefined, digits = 3): string {
  return v === undefined || !Number.isFinite(v) ? '–' : v.toFixed(digits);
}

/** Token counts as 1.23M / 456K / 789. */
export function tokensText(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(0)}K`;
  return String(Math.round(n));
}

/** Seconds as 12.3 s or 4 min 05 s. */
export function secondsText(s: number): string {
  if (s < 60) return `${s.toFixed(1)} s`;
  const t = Math.round(s);
  const m = Math.floor(t / 60);
  return `${m} min ${String(t - 60 * m).padStart(2, '0')} s`;
}
