/**
 * Locating the shared fixtures (`AMALGAM_FIXTURES`, default ../shared/fixtures from the repo root).
 * When they are missing, tests that need them skip with a clear message, except under CI=true,
 * where missing fixtures are a failure.
 */
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

export function fixturesDir(): string {
  return resolve(process.env.AMALGAM_FIXTURES ?? join(REPO_ROOT, '..', 'shared', 'fixtures'));
}

/** Absolute path of a fixture file, relative to the fixtures folder. */
export function fixture(rel: string): string {
  return join(fixturesDir(), rel);
}

/**
 * Returns true when every listed fixture exists. Otherwise skips the test (or, under CI=true,
 * throws so that the test fails) and returns false.
 */
export function haveFixtures(t: TestContext, ...rels: string[]): boolean {
  const missing = rels.filter((r) => !existsSync(fixture(r)));
  if (missing.length === 0) return true;
  const msg = `fixtures missing under ${fixturesDir()}: ${missing.join(', ')} (set AMALGAM_FIXTURES to the shared fixtures folder)`;
  if (process.env.CI === 'true') throw new Error(msg);
  t.skip(msg);
  return false;
}
