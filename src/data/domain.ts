/**
 * A 3-class domain-identification task built deterministically from three text sources:
 * 0 = a TinyStories paragraph, 1 = a Tiny Shakespeare passage (blank-line-separated block longer
 * than 80 characters), 2 = a GSM8K question.
 *
 * Each source is split into disjoint parts in file order: TinyStories paragraphs and Shakespeare
 * passages give their first 80 % to training and the rest to evaluation; GSM8K questions come from
 * its train file for training and its test file for evaluation. From each part a seeded random
 * selection of the requested size is taken; the evaluation set is class-balanced, holds no text
 * that also occurs in a training part, and both sets are shuffled with the seed.
 */
import { readFile } from 'node:fs/promises';
import { AmalgamError } from '../errors.js';
import { Rng } from '../tensor/rng.js';
import { shuffleInPlace } from './batching.js';
import { parseJsonl, parseTxt, type TextExample } from './datasets.js';

export const DOMAIN_LABELS = ['tinystories', 'shakespeare', 'gsm8k'] as const;

export interface DomainSources {
  /** TinyStories text, one paragraph per line (datasets/tinystories/val.txt). */
  tinystories: string;
  /** Tiny Shakespeare text (datasets/tinyshakespeare/input.txt). */
  shakespeare: string;
  /** GSM8K train and test JSON Lines (datasets/gsm8k/{train,test}.jsonl). */
  gsm8kTrain: string;
  gsm8kTest: string;
}

export interface DomainTaskOptions {
  /** Training examples per class (default 1000). */
  trainPerClass?: number;
  /** Evaluation examples per class (default 150). */
  evalPerClass?: number;
  seed?: number;
}

export interface DomainTask {
  train: TextExample[];
  eval: TextExample[];
  labelNames: string[];
}

/** Read the four source files. */
export async function readDomainSources(paths: Record<keyof DomainSources, string>): Promise<DomainSources> {
  const read = (p: string) => readFile(p, 'utf8');
  return {
    tinystories: await read(paths.tinystories),
    shakespeare: await read(paths.shakespeare),
    gsm8kTrain: await read(paths.gsm8kTrain),
    gsm8kTest: await read(paths.gsm8kTest),
  };
}

function pick(pool: string[], n: number, rng: Rng, what: string): string[] {
  if (pool.length < n) throw new AmalgamError('E_USAGE', `${what} has ${pool.length} texts, fewer than the ${n} requested`);
  const idx = shuffleInPlace(
    pool.map((_, i) => i),
    rng,
  ).slice(0, n);
  idx.sort((a, b) => a - b);
  return idx.map((i) => pool[i]!);
}

/** Build the domain task from the source texts. */
export function buildDomainTask(src: DomainSources, opts: DomainTaskOptions = {}): DomainTask {
  const nTrain = opts.trainPerClass ?? 1000;
  const nEval = opts.evalPerClass ?? 150;
  const rng = new Rng(opts.seed ?? 0);
  const stories = parseTxt(src.tinystories).examples.map((e) => e.text.trim());
  const passages = parseTxt(src.shakespeare, { txtMode: 'blocks' })
    .examples.map((e) => e.text.trim())
    .filter((t) => t.length > 80);
  const questions = (text: string) => parseJsonl(text, { textFields: ['question'], labelField: null }).examples.map((e) => e.text.trim());
  const cut = (xs: string[]) => Math.floor(xs.length * 0.8);
  const parts: [string[], string[]][] = [
    [stories.slice(0, cut(stories)), stories.slice(cut(stories))],
    [passages.slice(0, cut(passages)), passages.slice(cut(passages))],
    [questions(src.gsm8kTrain), questions(src.gsm8kTest)],
  ];
  const train: TextExample[] = [];
  const evalSet: TextExample[] = [];
  parts.forEach(([tr, ev], label) => {
    // Texts repeated in the sources ("The End.") are kept out of the evaluation part.
    const seen = new Set(tr);
    const evUnique = ev.filter((t) => !seen.has(t) && (seen.add(t), true));
    for (const text of pick(tr, nTrain, rng, `${DOMAIN_LABELS[label]} (train part)`)) train.push({ text, label });
    for (const text of pick(evUnique, nEval, rng, `${DOMAIN_LABELS[label]} (eval part)`)) evalSet.push({ text, label });
  });
  shuffleInPlace(train, rng);
  shuffleInPlace(evalSet, rng);
  return { train, eval: evalSet, labelNames: [...DOMAIN_LABELS] };
}

/** JSON Lines text of labelled examples ({"text", "label"} per line). */
export function toJsonl(examples: readonly TextExample[]): string {
  return examples.map((e) => JSON.stringify(e.label === undefined ? { text: e.text } : { text: e.text, label: e.label })).join('\n') + '\n';
}
