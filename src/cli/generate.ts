import type { Command } from 'commander';
import { generateText } from '../train/generate-text.js';
import { parseInteger, parseNumber } from '../train/options.js';

interface GenerateCliOptions {
  prompt?: string;
  maxTokens: number;
  temperature: number;
  topK: number;
  topP: number;
  seed: number;
  adapter?: string;
  json?: boolean;
}

export function registerGenerate(program: Command): void {
  program
    .command('generate')
    .description('Generate text from a model: BOS + prompt, then greedy decoding (temperature 0) or seeded sampling with temperature, top-k and top-p.')
    .argument('<model>', 'Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or a GGUF / llama2.c file (converted on the fly)')
    .option('--prompt <text>', 'text to continue (default: none, start from BOS)')
    .option('--max-tokens <n>', 'tokens to generate at most', (v) => parseInteger(v, '--max-tokens', 0), 256)
    .option('--temperature <t>', 'sampling temperature; 0 is greedy', (v) => parseNumber(v, '--temperature', 0), 0)
    .option('--top-k <k>', 'sample from the k most likely tokens (0: all)', (v) => parseInteger(v, '--top-k', 0), 0)
    .option('--top-p <p>', 'sample from the smallest set of tokens whose probability reaches p', (v) => parseNumber(v, '--top-p', 0, 1), 1)
    .option('--seed <n>', 'seed of the sampler', (v) => parseInteger(v, '--seed', 0), 0)
    .option('--adapter <dir>', 'apply a PEFT LoRA adapter folder to the model')
    .option('--json', 'print one JSON object (text, token ids, stop reason) instead of streaming the text')
    .action(async (modelDir: string, o: GenerateCliOptions) => {
      let printed = 0;
      const r = await generateText(modelDir, {
        prompt: o.prompt ?? '',
        maxTokens: o.maxTokens,
        temperature: o.temperature,
        topK: o.topK,
        topP: o.topP,
        seed: o.seed,
        adapter: o.adapter,
        onText: o.json
          ? undefined
          : (text) => {
              process.stdout.write(text.slice(printed));
              printed = text.length;
            },
      });
      if (o.json) process.stdout.write(JSON.stringify(r) + '\n');
      else process.stdout.write(r.text.slice(printed) + '\n');
    });
}
