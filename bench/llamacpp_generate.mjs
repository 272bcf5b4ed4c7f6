// Load a GGUF file in real llama.cpp (through node-llama-cpp's prebuilt binaries) and report what it does
// with it: the metadata llama.cpp read, its tokenization of chat-formatted text, the prompt the GGUF's own
// chat template renders, and greedy (temperature 0) continuations of given prompt token ids.
//
// Usage: node bench/llamacpp_generate.mjs REQUEST.json   (node-llama-cpp resolved from NODE_PATH or cwd)
// REQUEST: {"model": "x.gguf", "max_new_tokens": 32, "check_ids": [2, 151645], "texts": ["any text", ...],
//           "cases": [{"text": "<|im_start|>user\n...", "messages": [{"role": "user", "content": "..."}],
//                      "prompt_ids": [1, 2, ...]}]}
// Prints one JSON object on stdout (llama.cpp's own logs go to stderr).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(join(process.cwd(), "noop.js"));
const { getLlama, LlamaLogLevel, JinjaTemplateChatWrapper, resolveChatWrapper } =
    await import(require.resolve("node-llama-cpp"));

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: 1 });
const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
const meta = model.fileInfo.metadata;
const template = meta.tokenizer?.chat_template ?? null;
const jinja = template ? new JinjaTemplateChatWrapper({ template, convertUnsupportedSystemMessagesToUserMessages: false }) : null;

const info = {
    architecture: model.architecture,
    vocabulary_type: model.vocabularyType,
    pre_tokenizer: meta.tokenizer?.ggml?.pre ?? null,
    bos: model.tokens.bos, eos: model.tokens.eos, eot: model.tokens.eot,
    chat_template: template,
    default_chat_wrapper: resolveChatWrapper(model)?.wrapperName ?? null,
    eog: Object.fromEntries((request.check_ids ?? []).map((id) => [id, model.isEogToken(id)])),
    warnings: model.getWarnings(),
    texts_tokenized: (request.texts ?? []).map((text) => model.tokenize(text, true)),
};

const context = await model.createContext({ contextSize: request.context_size ?? 1024, threads: 1 });
const cases = [];
for (const item of request.cases) {
    const sequence = context.getSequence();
    const out = { tokenized: model.tokenize(item.text, true), template_ids: null, generated: [], top2: [], stopped_on_eog: false };
    if (jinja && item.messages) {
        const history = item.messages.map((m) => m.role === "assistant"
            ? { type: "model", response: [m.content] } : { type: m.role, text: m.content });
        history.push({ type: "model", response: [] });
        out.template_ids = jinja.generateContextState({ chatHistory: history }).contextText.tokenize(model.tokenizer);
    }
    const steps = sequence.evaluateWithMetadata(item.prompt_ids, { probabilities: true },
        { temperature: 0, topK: 0, topP: 1, yieldEogToken: true });
    for await (const step of steps) {
        const [[first, p1], [second, p2] = [null, 0]] = [...step.probabilities.entries()].slice(0, 2);
        out.generated.push(step.token);
        out.top2.push([first, p1, second, p2]);
        if (model.isEogToken(step.token)) { out.stopped_on_eog = true; break; }
        if (out.generated.length >= request.max_new_tokens) break;
    }
    out.text = model.detokenize(out.generated.filter((t) => !model.isEogToken(t)));
    sequence.dispose();
    cases.push(out);
}
await context.dispose();
await model.dispose();
process.stdout.write(JSON.stringify({ info, cases }) + "\n");
