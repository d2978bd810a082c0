import type { Command } from 'commander';
import { inspectPath, type InspectReport } from '../inspect.js';
import { parseInteger } from '../train/options.js';

export function registerInspect(program: Command): void {
  program
    .command('inspect')
    .description('Describe a checkpoint: a safetensors file, a Hugging Face model folder, a GGUF or llama2.c file, or a PEFT adapter folder.')
    .argument('<path>', 'file or folder to inspect')
    .option('--json', 'print one JSON object instead of tables')
    .option('--limit <n>', 'show at most this many tensor rows (0 = all)', (v) => parseInteger(v, '--limit', 0), 40)
    .action(async (path: string, opts: { json?: boolean; limit: number }) => {
      const report = await inspectPath(path);
      if (opts.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
      else printInspectReport(report, { limit: opts.limit });
    });
}

export function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}

export function formatBytes(n: number): string {
  if (n >= 1 << 30) return `${(n / (1 << 30)).toFixed(2)} GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(2)} MiB`;
  if (n >= 1 << 10) return `${(n / (1 << 10)).toFixed(1)} KiB`;
  return `${n} B`;
}

export function printInspectReport(r: InspectReport, opts: { limit?: number }): void {
  const out: string[] = [];
  out.push(`path:          ${r.path}`);
  out.push(`kind:          ${r.kind}`);
  if (r.architecture) {
    out.push(`architecture:  ${r.architecture.name}${r.architecture.inferred ? ' (inferred from tensor names)' : ''}, ${r.architecture.numLayers} layers`);
  }
  const dt = Object.entries(r.parameters.byDtype)
    .map(([d, n]) => `${d} ${formatCount(n)}`)
    .join(', ');
  out.push(`parameters:    ${r.parameters.total.toLocaleString('en-US')} (${formatCount(r.parameters.total)}; ${dt || 'none'})`);
  out.push(`tensor data:   ${formatBytes(r.bytes)} in ${r.tensors.length} tensors`);
  if (r.files.length) out.push(`files:         ${r.files.join(', ')}`);
  if (r.adapter) {
    for (const [k, v] of Object.entries(r.adapter)) out.push(`adapter ${k}: ${typeof v === 'string' ? v : JSON.stringify(v)}`);
  }
  const md = Object.entries(r.metadata);
  if (md.length) {
    out.push('metadata:');
    for (const [k, v] of md) out.push(`  ${k}: ${v.length > 100 ? v.slice(0, 97) + '...' : v}`);
  }
  for (const n of r.notes) out.push(`note: ${n}`);
  const limit = opts.limit ?? 40;
  const rows = limit > 0 ? r.tensors.slice(0, limit) : r.tensors;
  if (rows.length) {
    const nameW = Math.min(70, Math.max(4, ...rows.map((t) => t.name.length)));
    const dtypes = rows.map((t) => (t.stored ? `${t.dtype} (${t.stored})` : t.dtype));
    const dtW = Math.max(5, ...dtypes.map((d) => d.length));
    out.push('');
    out.push(`${'name'.padEnd(nameW)}  ${'dtype'.padEnd(dtW)}  shape`);
    rows.forEach((t, i) => out.push(`${t.name.padEnd(nameW)}  ${dtypes[i]!.padEnd(dtW)}  [${t.shape.join(', ')}]`));
    if (rows.length < r.tensors.length) out.push(`... ${r.tensors.length - rows.length} more (use --limit 0 to list all, or --json)`);
  }
  process.stdout.write(out.join('\n') + '\n');
}
