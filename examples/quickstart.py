"""Offline generation with the embedded model (SmolLM2-135M-Instruct): `make quickstart`."""

import time

from arborlm.runtime import Engine

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
]


def main():
    t0 = time.perf_counter()
    with Engine() as engine:  # model_path=None: the embedded default model
        print(f"engine ready in {time.perf_counter() - t0:.1f}s")
        prompts = [
            engine.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True)
            for q in QUESTIONS
        ]
        outputs = engine.generate(prompts, {"temperature": 0, "max_new_tokens": 96})
        for q, out in zip(QUESTIONS, outputs):
            meta = out["meta_info"]
            print(f"\n>>> {q}\n{out['text'].strip()}\n[{meta['completion_tokens']} tokens, "
                  f"finish={meta['finish_reason']['type']}, {meta['e2e_latency']:.2f}s]")


if __name__ == "__main__":
    main()
