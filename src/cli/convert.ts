import type { Command } from 'commander';

export function registerConvert(program: Command): void {
  program
    .command('convert')
    .description('Convert a GGUF or llama2.c checkpoint into a Hugging Face Llama folder (config.json, model.safetensors, tokenizer.json).')
    .argument('<input>', 'a .gguf file, or a llama2.c .bin file (with tok512.bin / tokenizer.bin beside it)')
    .argument('<out-dir>', 'output folder (created; must not exist or be empty)')
    .action(async () => {
      throw new Error('convert is not wired yet');
    });
}
