/** Spelling suggestions for unknown keys and names. */

/**
 * Edit distance with insertions, deletions, substitutions and transpositions of adjacent
 * characters (optimal string alignment), so `layer_rnage` is one edit from `layer_range`.
 */
export function editDistance(a: string, b: string): number {
  const n = a.length;
  const m = b.length;
  if (n === 0) return m;
  if (m === 0) return n;
  // Three rolling rows: i-2, i-1, i.
  let prev2 = new Array<number>(m + 1).fill(0);
  let prev = new Array<number>(m + 1);
  let cur = new Array<number>(m + 1);
  for (let j = 0; j <= m; j++) prev[j] = j;
  for (let i = 1; i <= n; i++) {
    cur[0] = i;
    for (let j = 1; j <= m; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let d = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        d = Math.min(d, prev2[j - 2] + 1);
      }
      cur[j] = d;
    }
    const t = prev2;
    prev2 = prev;
    prev = cur;
    cur = t;
  }
  return prev[m];
}

/**
 * Candidates close to `word`, best first (at most `limit`). Case is ignored when comparing.
 * A candidate qualifies when its distance is at most about 40% of the longer string and smaller
 * than the candidate's length (so one-letter names are never "close" to other one-letter names).
 */
export function closestMatches(word: string, candidates: Iterable<string>, limit = 3): string[] {
  const w = word.toLowerCase();
  const scored: { c: string; d: number }[] = [];
  for (const c of new Set(candidates)) {
    const cl = c.toLowerCase();
    const d = cl === w ? 0 : editDistance(w, cl);
    const threshold = Math.max(1, Math.floor(Math.max(w.length, cl.length) * 0.4));
    if (d <= threshold && (d < cl.length || d === 0)) scored.push({ c, d });
  }
  scored.sort((x, y) => x.d - y.d || x.c.localeCompare(y.c));
  return scored.slice(0, limit).map((s) => s.c);
}

/** "did you mean `x`?" for the closest candidate, or undefined when nothing is close. */
export function didYouMean(word: string, candidates: Iterable<string>): string | undefined {
  const [best] = closestMatches(word, candidates, 1);
  return best === undefined ? undefined : `did you mean \`${best}\`?`;
}
