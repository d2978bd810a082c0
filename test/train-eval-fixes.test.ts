/**
 * Train / eval label handling and option checks on stories260K: a classification adapter records
 * its class names and eval reads string labels through them; the output folder is checked before
 * training; bad labels are rejected naming the line and negative labels mark unlabelled examples;
 * LM training from a classifier writes a causal-LM config; contradicting --labels and
 * out-of-range labels are reported; conflicting or useless options are refused.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { cp, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { convertToHf } from '../src/convert/to-hf.js';
import { parseJsonl, parseTsv } from '../src/data/datasets.js';
import { AmalgamError } from '../src/errors.js';
import { openSafetensors, writeSafetensorsFile } from '../src/io/safetensors.js';
import { evaluateFile, type ClassifyEvalReport } from '../src/train/evaluate.js';
import { parseLoraSpec } from '../src/train/options.js';
import { runTraining, type RunTrainingOptions } from '../src/train/trainer.js';
import { fixture, haveFixtures } from './helpers/fixtures.js';

const GGUF = 'models/stories260K/stories260K.gguf';
const RTE = 'datasets/rte/train.tsv';
const VAL = 'datasets/tinystories/val.txt';

let root = '';
let base = '';
let rteTrain = '';
let rteNot = '';
let text = '';

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'amalgam-train-eval-fixes-'));
  if (![GGUF, RTE, VAL].every((f) => existsSync(fixture(f)))) return;
  base = join(root, 'stories260K');
  await convertToHf(fixture(GGUF), base);
  const rows = (await readFile(fixture(RTE), 'utf8')).split('\n').filter((l) => l.trim() !== '');
  const header = rows[0]!;
  // 40 rows holding both classes; an eval file holding only "not_entailment" rows.
  rteTrain = join(root, 'rte-train.tsv');
  await writeFile(rteTrain, rows.slice(0, 41).join('\n') + '\n');
  const notRows = rows.slice(41).filter((r) => r.endsWith('\tnot_entailment'));
  rteNot = join(root, 'rte-not.tsv');
  await writeFile(rteNot, [header, ...notRows.slice(0, 12)].join('\n') + '\n');
  const lines = (await readFile(fixture(VAL), 'utf8')).split('\n').filter((l) => l.trim() !== '');
  text = join(root, 'text.txt');
  await writeFile(text, lines.slice(0, 25).join('\n') + '\n');
});

after(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

const TINY: RunTrainingOptions = { steps: 1, batchSize: 4, seqLen: 16, maxLength: 24, progress: false };

describe('classification labels of adapters (eval --adapter)', () => {
  test('the adapter records id2label / label2id and eval reads string labels through them', async (t) => {
    if (!haveFixtures(t, GGUF, RTE)) return;
    const adapter = join(root, 'adapter-rte');
    const r = await runTraining(base, rteTrain, adapter, { ...TINY, steps: 3, task: 'classify', lora: parseLoraSpec('r=4,alpha=8') });
    assert.deepEqual(r.labelNames, ['entailment', 'not_entailment']);
    // In the weights' metadata, not in adapter_config.json (older PEFT refuses unknown keys there).
    const cfg = JSON.parse(await readFile(join(adapter, 'adapter_config.json'), 'utf8'));
    assert.equal('id2label' in cfg, false);
    const weights = await openSafetensors(join(adapter, 'adapter_model.safetensors'));
    const tensors = await Promise.all(weights.tensors().map(async (t) => ({ name: t.name, dtype: t.dtype, shape: t.shape.slice(), data: await weights.readRaw(t.name) })));
    const metadata = { ...weights.metadata };
    await weights.close();
    assert.deepEqual(JSON.parse(metadata['id2label']!), { '0': 'entailment', '1': 'not_entailment' });

    // Only "not_entailment" rows: they must be class 1, as in training.
    const warnings: string[] = [];
    const ev = (await evaluateFile(base, rteNot, { task: 'classify', adapter, maxLength: 24, onWarning: (m) => warnings.push(m) })) as ClassifyEvalReport;
    assert.deepEqual(ev.labels, ['entailment', 'not_entailment']);
    assert.deepEqual(ev.support, [0, 12]);
    const named = (await evaluateFile(base, rteNot, { task: 'classify', adapter, maxLength: 24, dataset: { labelNames: ['entailment', 'not_entailment'] } })) as ClassifyEvalReport;
    assert.equal(ev.correct, named.correct);
    assert.equal(ev.loss, named.loss);
    assert.equal(warnings.length, 0);

    // --labels in another order: read as asked, with a warning naming the recorded names.
    const swapped = (await evaluateFile(base, rteNot, {
      task: 'classify',
      adapter,
      maxLength: 24,
      dataset: { labelNames: ['not_entailment', 'entailment'] },
      onWarning: (m) => warnings.push(m),
    })) as ClassifyEvalReport;
    assert.deepEqual(swapped.support, [12, 0]);
    assert.equal(warnings.length, 1);
    assert.match(warnings[0]!, /--labels not_entailment,entailment differ from the class names recorded with the adapter's head \(entailment, not_entailment/);
    assert.match(warnings[0]!, /adapter_model\.safetensors/);

    // An adapter without recorded names: the file alone numbers the labels, with a warning.
    const bare = join(root, 'adapter-rte-bare');
    await cp(adapter, bare, { recursive: true });
    delete metadata['id2label'];
    await writeSafetensorsFile(join(bare, 'adapter_model.safetensors'), tensors, metadata);
    const bareWarnings: string[] = [];
    const old = (await evaluateFile(base, rteNot, { task: 'classify', adapter: bare, maxLength: 24, onWarning: (m) => bareWarnings.push(m) })) as ClassifyEvalReport;
    assert.deepEqual(old.support, [12, 0]);
    assert.equal(bareWarnings.length, 1);
    assert.match(bareWarnings[0]!, /^the adapter's head records no class names \(id2label\): the labels of .*rte-not\.tsv are numbered in sorted order \(not_entailment\)/);
  });
});

describe('output folder checked before training', () => {
  test('--out under a file fails before the data is read or a step is run', async (t) => {
    if (!haveFixtures(t, GGUF)) return;
    const afile = join(root, 'afile');
    await writeFile(afile, 'not a folder\n');
    let steps = 0;
    // The data file does not exist: the output error must come first.
    await assert.rejects(
      runTraining(base, join(root, 'missing.txt'), join(afile, 'sub'), { ...TINY, onStep: () => steps++ }),
      (e: AmalgamError) => e.code === 'E_IO' && e.file === join(afile, 'sub') && /a part of its path is a file/.test(e.message),
    );
    assert.equal(steps, 0);
  });

  test('an output that holds the training data is refused before training', async (t) => {
    if (!haveFixtures(t, GGUF, VAL)) return;
    const dir = join(root, 'data-dir');
    await mkdir(dir);
    const data = join(dir, 'text.txt');
    await writeFile(data, await readFile(text));
    let steps = 0;
    await assert.rejects(runTraining(base, data, dir, { ...TINY, overwrite: true, onStep: () => steps++ }), /output folder holds the input .*data-dir\/text\.txt/);
    assert.equal(steps, 0);
    assert.equal(existsSync(data), true);
  });
});

describe('bad labels', () => {
  test('an empty label is an error naming the file and line (tsv and jsonl)', () => {
    const tsv = 'sentence\tlabel\ngood\t1\nbad\t0\nmeh\t\nok\t1\n';
    assert.throws(
      () => parseTsv(tsv, { requireLabels: true }, 'e.tsv'),
      (e: AmalgamError) => e.code === 'E_FORMAT' && e.file === 'e.tsv' && /line 4: the label \(column 'label'\) is empty/.test(e.message),
    );
    assert.throws(() => parseJsonl('{"text": "a", "label": 1}\n{"text": "b", "label": " "}\n', { requireLabels: true }, 'e.jsonl'), /e\.jsonl: 'label': line 2: the label is empty/);
    // Where labels are not required (language modelling), the row is read without a label.
    const lm = parseTsv(tsv, {}, 'e.tsv');
    assert.deepEqual(
      lm.examples.map((e) => e.label),
      [1, 0, undefined, 1],
    );
    assert.equal(lm.numClasses, 2);
  });

  test('a negative label marks an unlabelled example: left out of classification, listed by line', () => {
    const tsv = 'sentence\tlabel\ngood\t1\nbad\t0\nunknown\t-1\nok\t1\n';
    const ds = parseTsv(tsv, { requireLabels: true });
    assert.deepEqual(
      ds.examples.map((e) => [e.text, e.label]),
      [
        ['good', 1],
        ['bad', 0],
        ['ok', 1],
      ],
    );
    assert.equal(ds.numClasses, 2);
    assert.deepEqual(ds.negativeLabelLines, [4]);
    assert.equal(ds.labelNames, undefined);
    const js = parseJsonl('{"text": "a", "label": 0}\n{"text": "b", "label": -1}\n{"text": "c", "label": 1}\n', { requireLabels: true });
    assert.deepEqual(
      js.examples.map((e) => e.label),
      [0, 1],
    );
    assert.deepEqual(js.negativeLabelLines, [2]);
    // With names: "-1" is not a class either.
    const named = parseTsv('a\tentailment\nb\t-1\n', { requireLabels: true, header: false });
    assert.deepEqual(named.labelNames, ['entailment']);
    assert.equal(named.examples.length, 1);
  });

  test('non-integer numbers and integers mixed with names are errors naming the line', () => {
    assert.throws(() => parseTsv('sentence\tlabel\ngood\t1\nbad\t0\nhalf\t1.5\n', {}, 'f.tsv'), /f\.tsv: line 4: label "1\.5" is a number but not an integer class index/);
    assert.throws(() => parseJsonl('{"text": "a", "label": 0}\n{"text": "b", "label": 0.5}\n', {}, 'f.jsonl'), /line 2: label 0\.5 is a number but not an integer/);
    assert.throws(
      () => parseTsv('sentence\tlabel\ngood\t1\nbad\t0\nx\tpositive\n', {}, 'm.tsv'),
      /m\.tsv: line 4: label "positive" is a class name but line 2 has an integer class index \("1"\)/,
    );
    // With the class names given, numbers and names are looked up.
    const named = parseTsv('sentence\tlabel\ngood\t1\nx\tpositive\n', { labelNames: ['negative', 'positive'] });
    assert.deepEqual(
      named.examples.map((e) => e.label),
      [1, 1],
    );
  });

  test('train warns about left-out negative labels', async (t) => {
    if (!haveFixtures(t, GGUF)) return;
    const data = join(root, 'neg.tsv');
    await writeFile(data, 'sentence\tlabel\ngood\t1\nbad\t0\nunknown\t-1\nok\t1\nfine\t0\n');
    const seen: string[] = [];
    const r = await runTraining(base, data, join(root, 'out-neg'), { ...TINY, task: 'classify', onWarning: (m) => seen.push(m) });
    assert.equal(r.trainExamples, 4);
    assert.equal(r.warnings.length, 1);
    assert.match(r.warnings[0]!, /neg\.tsv: 1 example has a negative label \(unlabelled\) and is left out \(line 4\)/);
    assert.deepEqual(seen, r.warnings);
  });
});

describe('LM training from a classifier folder', () => {
  test('writes a causal-LM config without the classifier keys, and no score.weight', async (t) => {
    if (!haveFixtures(t, GGUF, RTE, VAL)) return;
    const cls = join(root, 'classifier');
    await runTraining(base, rteTrain, cls, { ...TINY, task: 'classify' });
    const clsCfg = JSON.parse(await readFile(join(cls, 'config.json'), 'utf8'));
    assert.deepEqual(clsCfg.architectures, ['LlamaForSequenceClassification']);
    assert.equal(clsCfg.num_labels, 2);

    const lm = join(root, 'lm-from-classifier');
    const r = await runTraining(cls, text, lm, { ...TINY, task: 'lm' });
    assert.equal(r.output, 'model');
    const cfg = JSON.parse(await readFile(join(lm, 'config.json'), 'utf8'));
    assert.deepEqual(cfg.architectures, ['LlamaForCausalLM']);
    assert.equal('num_labels' in cfg, false);
    assert.equal('id2label' in cfg, false);
    assert.equal('label2id' in cfg, false);
    assert.equal(cfg.hidden_size, clsCfg.hidden_size);
    const st = await openSafetensors(lm);
    try {
      assert.equal(st.has('score.weight'), false);
      assert.equal(st.has('lm_head.weight'), true);
    } finally {
      await st.close();
    }

    // Classification from the classifier with --labels in another order: a warning.
    const again = await runTraining(cls, rteTrain, join(root, 'classifier-again'), { ...TINY, task: 'classify', dataset: { labelNames: ['not_entailment', 'entailment'] } });
    assert.equal(again.warnings.length, 1);
    assert.match(again.warnings[0]!, /^--labels number the classes not_entailment, entailment, but the head of .*classifier\/config\.json was trained with entailment, not_entailment/);
    const same = await runTraining(cls, rteTrain, join(root, 'classifier-same'), { ...TINY, task: 'classify' });
    assert.deepEqual(same.warnings, []);
  });
});

describe('eval label checks', () => {
  test('an integer label beyond the head says it is out of range for the N-class head', async (t) => {
    if (!haveFixtures(t, GGUF)) return;
    const train = join(root, 'int.tsv');
    await writeFile(train, 'sentence\tlabel\ngood\t1\nbad\t0\nok\t1\nfine\t0\n');
    const model = join(root, 'int-classifier');
    await runTraining(base, train, model, { ...TINY, task: 'classify' });
    const five = join(root, 'five.tsv');
    await writeFile(five, 'sentence\tlabel\ngood\t1\nbad\t5\n');
    await assert.rejects(evaluateFile(model, five, { task: 'classify' }), (e: AmalgamError) => {
      assert.match(e.message, /five\.tsv: line 3: label 5 is out of range for the model's 2-class head \(class indices 0 to 1\)/);
      assert.doesNotMatch(e.message, /not one of/);
      return true;
    });
    // LABEL_0 / LABEL_1 record no names: --labels contradicts nothing.
    const warnings: string[] = [];
    const ev = (await evaluateFile(model, train, { task: 'classify', dataset: { labelNames: ['neg', 'pos'] }, onWarning: (m) => warnings.push(m) })) as ClassifyEvalReport;
    assert.equal(ev.total, 4);
    assert.equal(warnings.length, 0);
  });
});

describe('conflicting or useless train options', () => {
  test('--holdout with --eval-data, a holdout of no example, --eval-every without held-out data', async (t) => {
    if (!haveFixtures(t, GGUF, VAL)) return;
    const out = join(root, 'out-opts');
    await assert.rejects(runTraining(base, text, out, { ...TINY, holdout: 0.1, evalData: text }), (e: AmalgamError) => e.code === 'E_USAGE' && /--holdout 0\.1 and --eval-data .* both choose/.test(e.message));
    await assert.rejects(
      runTraining(base, text, out, { ...TINY, holdout: 0.01 }),
      (e: AmalgamError) => e.code === 'E_USAGE' && /--holdout 0\.01 of 25 examples holds out none/.test(e.message) && /--holdout 0\.02 or more/.test(e.message),
    );
    await assert.rejects(runTraining(base, text, out, { ...TINY, evalEvery: 2 }), /--eval-every 2 needs held-out data/);
    assert.equal(existsSync(out), false);
    const r = await runTraining(base, text, out, { ...TINY, steps: 2, holdout: 0.2, evalEvery: 5 });
    assert.equal(r.evalExamples, 5);
    assert.deepEqual(r.warnings, ['--eval-every 5 is not below --steps 2: the held-out data is evaluated only before and after training']);
  });

  test('LoRA alpha must be positive; every target must name a linear layer', async (t) => {
    assert.throws(() => parseLoraSpec('alpha=-1'), (e: AmalgamError) => e.code === 'E_USAGE' && /LoRA alpha must be a positive number, got "-1"/.test(e.message));
    assert.throws(() => parseLoraSpec('r=4,alpha=0'), /LoRA alpha must be a positive number/);
    assert.equal(parseLoraSpec('alpha=0.5').alpha, 0.5);
    if (!haveFixtures(t, GGUF, VAL)) return;
    await assert.rejects(
      runTraining(base, text, join(root, 'out-lora'), { ...TINY, lora: parseLoraSpec('targets=q_proj,qq_proj') }),
      (e: AmalgamError) => e.code === 'E_USAGE' && /LoRA target 'qq_proj' matches no linear layer/.test(e.message) && /q_proj, k_proj/.test(e.hint ?? ''),
    );
    await assert.rejects(runTraining(base, text, join(root, 'out-lora'), { ...TINY, lora: { r: 4, alpha: -1, targets: ['q_proj'] } }), /LoRA alpha must be a positive number, got -1/);
  });
});
