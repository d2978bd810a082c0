import type { Command } from 'commander';
import { convertToHf } from '../convert/to-hf.js';
import { parseInteger } from '../train/options.js';

export function registerConvert(program: Command): void {
  program
    .command('convert')
    .description('Convert a GGUF or llama2.c checkpoint into a Hugging Face Llama folder (config.json, model.safetensors, tokenizer.json).')
    .argument('<input>', 'a .gguf file, or a llama2.c .bin file (with tok512.bin / tokenizer.bin beside it)')
    .argument('<out-dir>', 'output folder (created; must not exist or be empty unless --overwrite)')
    .option('--tokenizer <file>', 'llama2.c tokenizer file (default: tok<vocab>.bin or tokenizer.bin beside the model)')
    .option('--max-position-embeddings <n>', 'max_position_embeddings in config.json (default: llama2.c seq_len, or the GGUF context length)', (v) => parseInteger(v, '--max-position-embeddings', 1))
    .option('--overwrite', 'replace the output folder if it exists')
    .option('--json', 'print the result as JSON')
    .action(async (input: string, outDir: string, opts: { tokenizer?: string; maxPositionEmbeddings?: number; overwrite?: boolean; json?: boolean }) => {
      const r = await convertToHf(input, outDir, {
        tokenizer: opts.tokenizer,
        maxPositionEmbeddings: opts.maxPositionEmbeddings,
        overwrite: opts.overwrite,
      });
      if (opts.json) {
        process.stdout.write(JSON.stringify(r, null, 2) + '\n');
        return;
      }
      const c = r.config;
      process.stdout.write(
        [
          `Converted ${r.input} (${r.format}) to ${r.outDir}`,
          `  model:     ${c.num_hidden_layers} layers, hidden ${c.hidden_size}, ffn ${c.intermediate_size}, heads ${c.num_attention_heads}/${c.num_key_value_heads} (q/kv), vocab ${c.vocab_size}`,
          `  weights:   ${r.tensorCount} tensors, ${r.parameterCount.toLocaleString('en-US')} values -> ${r.files.weights}`,
          `  tokenizer: from ${r.tokenizerSource} -> ${r.files.tokenizer}`,
        ].join('\n') + '\n',
      );
    });
}
