#!/usr/bin/env python
"""Offline throughput: arborlm's Engine vs HuggingFace transformers `generate` vs llama.cpp, same model, same inputs.

Workloads (greedy decoding, exactly N new tokens: `ignore_eos` for arborlm, `min_new_tokens` for HF, a fixed
number of eval/sample steps for llama.cpp):
  W1  one ~64-token prompt -> 128 new tokens             tok/s = 128 / wall time of the generate call
      (prefill included); llama.cpp also reports "decode only" = 127 / (wall time - prefill).
  W2  32 different ~64-token prompts -> 128 new tokens   tok/s = 32*128 / wall time
      arborlm: one engine.generate(list of input_ids) call (continuous batching);
      transformers: one left-padded batch with an attention mask in model.generate;
      llama.cpp: llama-cpp-python has no batched generate, so the 32 prompts run one at a time
      ("sequential" in the table).
  W4  one 2048-token prompt, prefill                     tok/s = 2048 / wall time
      arborlm: max_new_tokens=1; transformers: generate with max_new_tokens=1;
      llama.cpp: reset(), eval of the 2048 ids, one greedy sample. (`W3` is accepted as an old alias.)

The systems:
  arborlm       Engine(dtype=--dtype, num_threads=--threads[, quantization=...]); one column per entry of
                --arborlm-configs (`default` = the engine's default, or none|int8|int4 = Engine(quantization=...)).
  transformers  AutoModelForCausalLM in --dtype on the HF directory arborlm converted the embedded GGUF to.
  llama.cpp     llama_cpp.Llama on the embedded Q4_1 GGUF itself (n_ctx 4096, n_batch 2048, --threads), when the
                `llama-cpp-python` package is installed (skipped with a note otherwise). Its own greedy sampler
                (temp 0), one eval per token, no EOS stop. Its weights are the 4-bit originals; arborlm and
                transformers run the same weights dequantised (unless arborlm is told to quantise).
                Install: pip install llama-cpp-python (a source build). On Sapphire Rapids its default
                -march=native build segfaults in ggml's AMX matmul (llama.cpp issue 20824); build it without AMX:
                CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
                -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON" pip install --no-cache-dir llama-cpp-python

All systems see identical token ids: a fixed English text is tokenised with the engine's tokenizer and
sliced at deterministic offsets (every run, warm-ups included, gets its own slices, so a prefix cache
cannot make a repeat free). llama.cpp tokenises the same text with the GGUF's own tokenizer and refuses
to run unless it gets exactly the engine's ids. Each workload runs once as a warm-up, then `--repeats`
times (use >= 3); the median is reported. Transformers is slow on CPUs, so its W2/W4 runs default to a
single timed repeat after a *short* warm-up (`--hf-repeats`, `--hf-warmup`).

Each system (and each arborlm config) is measured in its own subprocess (the script re-invokes itself
with `--only NAME`), so peak RSS (ru_maxrss) and start-up time are clean per system; the parent prints
the combined table, with the CPU (model name, avx2 / avx512f / avx512_bf16 / amx_bf16) and the execution
path arborlm took, and ratios of each arborlm column against transformers and llama.cpp.

    python benchmarks/bench_offline.py                        # everything, bf16, ~15-20 min on 2 cores
    python benchmarks/bench_offline.py --workloads W1 --repeats 5
    python benchmarks/bench_offline.py --arborlm-configs default,none --systems arborlm,llama.cpp
    python benchmarks/bench_offline.py --only arborlm --quantization int8   # one system, in this process
    python benchmarks/bench_offline.py --json                 # machine-readable result on stdout
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback

RESULT_TAG = "BENCH_RESULT "
TEXT_TAG = "BENCH_ENGINE_TEXT "
SYSTEMS = ("arborlm", "transformers", "llama.cpp")
REFERENCES = ("transformers", "llama.cpp")  # each arborlm column gets a ratio against these
SHORT = {"arborlm": "arb", "transformers": "hf", "llama.cpp": "llama"}
QUANTIZATIONS = ("none", "int8", "int4")
ALL_WORKLOADS = ("W1", "W2", "W4")
WORKLOAD_ALIASES = {"W3": "W4"}  # the 2048-token prefill was called W3 before issue 12
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")

W1_PROMPT, W1_NEW = 64, 128
W2_BATCH, W2_PROMPT, W2_NEW = 32, 64, 128
W4_PROMPT = 2048
LLAMA_N_CTX, LLAMA_N_BATCH = 4096, 2048

LABELS = {
    "W1": f"W1 decode b=1 ({W1_PROMPT}->{W1_NEW})",
    "W2": f"W2 batch {W2_BATCH} (~{W2_PROMPT}->{W2_NEW})",
    "W4": f"W4 prefill {W4_PROMPT}",
}
DECODE_ONLY_LABEL = f"W1 decode only ({W1_NEW - 1} tok)"

# Varied English prose (history, science, cooking, fiction, travel, economics, ...), tokenised once and
# cycled; any slice of it is an ordinary-looking prompt.
TEXT = """\
The harbour town woke slowly that morning. Fishermen hauled their nets onto the stone quay, gulls
circled above the market stalls, and the baker on Mill Street pulled the first trays of rye bread from
an oven that had been burning since four. Nobody paid much attention to the stranger who stepped off
the early ferry with a battered leather case and a map folded into a very small square.

In 1848 a wave of revolutions swept across Europe. Beginning in Sicily and spreading quickly to France,
the German states, the Austrian Empire and beyond, the uprisings were driven by a mix of economic
hardship, demands for constitutional government, and rising national feeling. Most were suppressed
within a year, yet they left lasting changes: serfdom was abolished in Austria, Denmark adopted a
constitution, and a generation of political thinkers drew very different lessons from the failures.

Photosynthesis converts light energy into chemical energy. In the thylakoid membranes of the
chloroplast, pigments such as chlorophyll absorb photons and drive the splitting of water, releasing
oxygen as a by-product. The energy captured is stored in ATP and NADPH, which the Calvin cycle then uses
to fix carbon dioxide into three-carbon sugars. Roughly half of the oxygen in the atmosphere comes from
microscopic algae in the oceans rather than from forests on land.

To make a simple tomato sauce, warm three tablespoons of olive oil in a wide pan over medium heat. Add
two sliced cloves of garlic and cook until they just begin to colour, then tip in a can of whole
peeled tomatoes and crush them with the back of a wooden spoon. Season with salt, add a pinch of
chilli flakes if you like, and let the sauce simmer for about twenty minutes, stirring now and then,
until it thickens. Finish with torn basil leaves and a little more oil.

A central bank usually tries to keep inflation low and stable. When prices rise too quickly it can
raise its policy interest rate, which makes borrowing more expensive, cools spending and investment,
and eventually slows the growth of wages and prices. Lowering rates has the opposite effect. Because
these changes work with long and variable lags, policymakers must act on forecasts, and they are often
criticised both for moving too late and for moving too early.

The train climbed steadily through the pine forest, its windows fogged with the breath of sleeping
passengers. At the small station near the pass, a conductor in a grey coat stepped down, checked his
watch, and waved a lantern at the driver. Beyond the ridge the valley opened suddenly: terraced
vineyards, a river the colour of slate, and a village whose church bell was ringing for no reason
anyone could later explain.

Software engineers often say that premature optimisation is the root of all evil, but the full quote
is more careful. It warns against spending effort on small efficiencies before measuring where the
time actually goes, while admitting that in the critical three percent of a program, careful tuning
matters a great deal. A good profiler, a reproducible benchmark and a clear hypothesis are usually
worth more than any amount of clever guessing.

Honey bees communicate the location of food through a behaviour called the waggle dance. A forager
returning to the hive runs in a figure-of-eight pattern, and the angle of the straight run relative
to vertical encodes the direction of the flowers relative to the sun, while the duration of the run
signals the distance. Other bees follow the dancer closely, sensing the vibrations and the scent of
the nectar she carries, and then fly out to find the patch themselves.

Mount Everest grows by a few millimetres each year as the Indian plate continues to push beneath the
Eurasian plate. Climbers attempting the summit usually spend weeks acclimatising, moving between base
camp and higher camps so that their bodies produce more red blood cells. Above eight thousand metres,
in the so-called death zone, the air holds roughly a third of the oxygen available at sea level, and
even simple decisions become difficult.

She read the letter twice before folding it back into its envelope. Her grandmother had written it in
1962, in blue ink that had faded to the colour of a winter sky, and it described a garden that no
longer existed: apple trees, a crooked wooden bench, and a pond where, according to the letter, a
single enormous carp had lived for more than thirty years and was known to the whole street as the
Mayor.

The printing press, developed in Mainz around 1440, made books cheaper and far more plentiful. Within
fifty years presses were operating in hundreds of European cities, and millions of volumes had been
produced. Standardised texts helped the spread of scientific ideas, religious debates and vernacular
literature, and the new trade in books created printers, booksellers and censors in equal measure.

When you learn a new language, regular short practice tends to beat occasional long sessions. Spaced
repetition, in which material is reviewed at gradually increasing intervals, exploits the way memory
consolidates over time. Speaking aloud, even to yourself, helps pronunciation and fluency, and reading
simple stories that you mostly understand builds vocabulary faster than memorising isolated lists.
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- the machine ------------------------------------------------------------------------------------
def cpu_info() -> dict:
    """CPU model name and the instruction-set flags that decide the bf16 / int kernels each system uses."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or "unknown", "cpus": os.cpu_count(),
            "flags": {f: f in flags for f in CPU_FLAGS}}


def cpu_line(cpu: dict) -> str:
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    return f"CPU: {cpu['model']} ({cpu['cpus']} CPUs), {flags}"


def arborlm_path(engine):
    """Which execution path arborlm took (dtype, kernels, quantisation), JSON-able; never raises.

    `engine.execution_path` when the engine reports it, else a `describe()` of the runner's execution plan
    or of the model, else the configured dtype, the compute dtype and whether the CPU has native bf16."""
    runner = getattr(getattr(engine, "core", None), "runner", None)
    path = getattr(engine, "execution_path", None)
    for owner in (getattr(runner, "plan", None), getattr(runner, "model", None)):
        if path is None and callable(getattr(owner, "describe", None)):
            try:
                path = owner.describe()
            except Exception as e:  # noqa: BLE001 - a report helper must not break the run
                path = f"describe() failed: {type(e).__name__}: {e}"
    if path is None:
        args, model = getattr(engine, "args", None), getattr(runner, "model", None)
        path = {"dtype": getattr(args, "dtype", None),
                "compute_dtype": str(getattr(model, "dtype", None)).replace("torch.", ""),
                "quantization": getattr(args, "quantization", None),
                "cpu_has_native_bf16": arborlm_native_bf16()}
    return json.loads(json.dumps(path, default=str))


def arborlm_native_bf16():
    for module in ("arborlm.runtime.model.execution", "arborlm.runtime.model.linear"):
        try:
            return importlib.import_module(module).cpu_has_native_bf16()
        except (ImportError, AttributeError):
            continue
    return None


def path_text(path) -> str:
    if isinstance(path, dict):
        return ", ".join(f"{k}={v}" for k, v in path.items() if v is not None)
    return str(path)


# ---- prompts ----------------------------------------------------------------------------------------
class Prompts:
    """Deterministic token-id prompts: slices of the tokenised TEXT, cycled; run r gets its own slices."""

    def __init__(self, stream: list[int]):
        self.stream = list(stream)
        n = len(self.stream)
        if n < 256:
            raise RuntimeError(f"the benchmark text tokenises to only {n} tokens")
        self.stride = 53
        while math.gcd(self.stride, n) != 1:
            self.stride += 2

    def _slice(self, start: int, length: int) -> list[int]:
        n = len(self.stream)
        return [self.stream[(start + k) % n] for k in range(length)]

    def w1(self, run: int) -> list[int]:
        return self._slice(7 + 211 * run, W1_PROMPT)

    def w2(self, run: int, batch: int = W2_BATCH, new_tokens: int = W2_NEW) -> list[list[int]]:
        # lengths vary in [56, 72] (mean ~64) so the transformers batch really needs left padding
        return [self._slice((run * W2_BATCH + i) * self.stride, W2_PROMPT - 8 + (i * 7) % 17) for i in range(batch)]

    def w4(self, run: int, length: int = W4_PROMPT) -> list[int]:
        return self._slice(389 * run + 3, length)  # the offsets of the former W3: figures stay comparable

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.stream).encode())
        return h.hexdigest()[:16]


def engine_text() -> dict:
    """The engine tokenizer's ids for TEXT, and the embedded GGUF's path (run in a helper subprocess)."""
    from arborlm.runtime.model.loader import embedded_gguf_path, load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(None).tokenizer_dir)
    return {"ids": list(tok.encode(TEXT, add_special_tokens=False)), "vocab": len(tok),
            "gguf": embedded_gguf_path()}


def engine_text_subprocess() -> dict:
    """engine_text() in a child process, so llama.cpp's process never imports torch (clean peak RSS)."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_engine-text"],
                       check=False, stdout=subprocess.PIPE, text=True, timeout=900)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(TEXT_TAG):
            return json.loads(line[len(TEXT_TAG):])
    raise RuntimeError(f"the engine-tokenizer helper exited with {p.returncode} and no result (see its stderr)")


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---- one system -------------------------------------------------------------------------------------
class ArborBackend:
    name = "arborlm"
    sequential: tuple = ()  # workloads whose prompts this backend runs one at a time

    def __init__(self, dtype: str, threads: int, quantization: str | None = None):
        import torch

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        from arborlm.runtime import Engine

        t1 = time.perf_counter()
        extra = {} if quantization is None else {"quantization": quantization}  # only when asked for
        self.engine = Engine(dtype=dtype, num_threads=threads, **extra)
        out = self.engine.generate(input_ids=[1, 2, 3, 4, 5, 6, 7, 8],
                                   sampling_params={"temperature": 0, "max_new_tokens": 1, "ignore_eos": True})
        t2 = time.perf_counter()
        if len(out["output_ids"]) != 1:
            raise RuntimeError(f"arborlm: the tiny start-up request returned {len(out['output_ids'])} tokens, not 1")
        self.import_s, self.startup_s = t1 - t0, t2 - t0
        self.tokenizer = self.engine.tokenizer
        self.cached_tokens = 0
        self.last_prefill_s = None
        self.info = {"quantization": quantization or "default", "path": arborlm_path(self.engine)}

    def text_ids(self) -> list[int]:
        return list(self.tokenizer.encode(TEXT, add_special_tokens=False))

    def settle(self, name: str, wl: str) -> None:
        """Timed runs start once the decode graphs the warm-up asked for have compiled (in the
        background: the warm-up itself decoded eagerly meanwhile)."""
        graphs = getattr(self.engine.runner, "decode_graphs", None)
        if graphs is not None:
            t = time.perf_counter()
            graphs.wait()
            log(f"{name} {wl}: decode graphs {sorted(graphs.ready)} ready after {time.perf_counter() - t:.1f} s more; "
                f"compile s {graphs.compile_seconds}")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        sp = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        outs = self.engine.generate(input_ids=prompts, sampling_params=sp)
        if not isinstance(outs, list) or len(outs) != len(prompts):
            raise RuntimeError(f"arborlm: {len(prompts)} prompts in, got {type(outs).__name__} "
                               f"of length {len(outs) if isinstance(outs, list) else '-'} back")
        res = []
        for i, o in enumerate(outs):
            ids, meta = o["output_ids"], o["meta_info"]
            if len(ids) != new_tokens or meta.get("completion_tokens") != new_tokens:
                raise RuntimeError(f"arborlm: prompt {i}: asked for {new_tokens} tokens, got len(output_ids)="
                                   f"{len(ids)}, completion_tokens={meta.get('completion_tokens')}, "
                                   f"finish_reason={meta.get('finish_reason')}")
            if meta.get("prompt_tokens") != len(prompts[i]):
                raise RuntimeError(f"arborlm: prompt {i}: prompt_tokens={meta.get('prompt_tokens')}, "
                                   f"expected {len(prompts[i])}")
            self.cached_tokens += int(meta.get("cached_tokens") or 0)
            res.append(list(ids))
        return res

    def close(self):
        self.engine.shutdown()


class HFBackend:
    name = "transformers"
    sequential: tuple = ()  # workloads whose prompts this backend runs one at a time

    def __init__(self, dtype: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        from transformers import AutoModelForCausalLM

        from arborlm.runtime.model.loader import load_tokenizer, resolve_model

        t1 = time.perf_counter()
        files = resolve_model(None)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(files.model_dir, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = load_tokenizer(files.tokenizer_dir)
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = gc.pad_token_id if gc.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.generate([[1, 2, 3, 4, 5, 6, 7, 8]], 1)
        t2 = time.perf_counter()
        self.import_s, self.startup_s = t1 - t0, t2 - t0
        self.cached_tokens = 0
        self.last_prefill_s = None
        self.info = {}

    def text_ids(self) -> list[int]:
        return list(self.tokenizer.encode(TEXT, add_special_tokens=False))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=self.pad_id)
        new = out[:, width:]
        if new.shape[1] != new_tokens:
            raise RuntimeError(f"transformers: asked for {new_tokens} tokens, got {new.shape[1]}")
        res = new.tolist()
        for i, row in enumerate(res):
            if any(t in self.eos_ids for t in row):
                raise RuntimeError(f"transformers: prompt {i}: EOS/padding inside the {new_tokens} new tokens")
        return res

    def close(self):
        pass


class LlamaCppBackend:
    """llama-cpp-python on the embedded GGUF; prompts one at a time through its eval / greedy-sample loop."""

    name = "llama.cpp"
    sequential = ("W2",)  # no batched generate in llama-cpp-python

    def __init__(self, threads: int):
        text = engine_text_subprocess()  # before the clock: it imports torch, in another process
        t0 = time.perf_counter()
        import llama_cpp

        t1 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=text["gguf"], n_threads=threads, n_threads_batch=threads,
                                   n_ctx=LLAMA_N_CTX, n_batch=LLAMA_N_BATCH, logits_all=False, verbose=False)
        self.generate([[1, 2, 3, 4, 5, 6, 7, 8]], 1)
        t2 = time.perf_counter()
        self.import_s, self.startup_s = t1 - t0, t2 - t0
        self.ids = self._check_tokenizer(text)
        self.cached_tokens = 0
        self.last_prefill_s = None
        sysinfo = llama_cpp.llama_print_system_info()
        self.info = {"version": llama_cpp.__version__, "gguf": os.path.basename(text["gguf"]),
                     "n_ctx": LLAMA_N_CTX, "n_batch": LLAMA_N_BATCH,
                     "system_info": (sysinfo.decode() if isinstance(sysinfo, bytes) else str(sysinfo)).strip()}

    def _check_tokenizer(self, text: dict) -> list[int]:
        ours = self.llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False)
        theirs = text["ids"]
        if ours != theirs:
            i = first_difference(ours, theirs)
            raise RuntimeError(
                f"llama.cpp's GGUF tokenizer and the engine tokenizer disagree on the benchmark text "
                f"({len(ours)} vs {len(theirs)} tokens, first difference at token {i}: llama.cpp "
                f"{ours[i:i + 5]} vs engine {theirs[i:i + 5]}; vocab {self.llm.n_vocab()} vs {text['vocab']}), "
                f"so the systems would not see the same ids")
        return theirs

    def text_ids(self) -> list[int]:
        return list(self.ids)

    def _one(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        llm = self.llm
        if len(prompt) + new_tokens > LLAMA_N_CTX:
            raise RuntimeError(f"llama.cpp: {len(prompt)} + {new_tokens} tokens exceed n_ctx={LLAMA_N_CTX}")
        llm.reset()  # n_tokens = 0: eval drops the whole KV cache, no prefix is reused
        t = time.perf_counter()
        llm.eval(prompt)
        prefill_s = time.perf_counter() - t
        out = []
        for k in range(new_tokens):  # greedy, no EOS stop: exactly new_tokens tokens
            tok = llm.sample(top_k=1, temp=0.0, repeat_penalty=1.0)
            out.append(int(tok))
            if k + 1 < new_tokens:
                llm.eval([tok])
        if llm.n_tokens != len(prompt) + new_tokens - 1:
            raise RuntimeError(f"llama.cpp: evaluated {llm.n_tokens} tokens, expected {len(prompt) + new_tokens - 1}")
        return out, prefill_s

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        res, self.last_prefill_s = [], 0.0
        for p in prompts:
            out, prefill_s = self._one(p, new_tokens)
            res.append(out)
            self.last_prefill_s += prefill_s
        return res

    def close(self):
        if hasattr(self.llm, "close"):
            self.llm.close()


def make_backend(name: str, args):
    if name == "arborlm":
        return ArborBackend(args.dtype, args.threads, args.quantization)
    if name == "transformers":
        return HFBackend(args.dtype, args.threads)
    return LlamaCppBackend(args.threads)


def arbor_column(config: str) -> str:
    return "arborlm" if config in (None, "default") else f"arborlm[{config}]"


def short_name(column: str) -> str:
    base, _, rest = column.partition("[")
    return SHORT.get(base, base) + ("[" + rest if rest else "")


def hf_runs(args, wl: str) -> int:
    spec = args.hf_repeats
    if spec is None:
        return args.repeats if wl == "W1" else 1
    return spec.get(wl, spec.get("*", args.repeats if wl == "W1" else 1))


def workload_plan(wl: str, prompts: Prompts, short_warmup: bool):
    """(tokens counted per run, new tokens per prompt, run -> prompts, warm-up prompts, warm-up new tokens)."""
    if wl == "W1":
        make = lambda r: [prompts.w1(r)]  # noqa: E731
        return W1_NEW, W1_NEW, make, make(0), W1_NEW
    if wl == "W2":
        warm = prompts.w2(0)[:4] if short_warmup else prompts.w2(0)
        return W2_BATCH * W2_NEW, W2_NEW, prompts.w2, warm, 8 if short_warmup else W2_NEW
    make = lambda r: [prompts.w4(r)]  # noqa: E731
    return W4_PROMPT, 1, make, [prompts.w4(0, 256)] if short_warmup else make(0), 1


def run_workload(be, name: str, wl: str, prompts: Prompts, args) -> dict:
    is_hf = name == "transformers"
    repeats = hf_runs(args, wl) if is_hf else args.repeats
    short_warmup = is_hf and args.hf_warmup == "short" and wl in ("W2", "W4")
    tokens, new, make, warm, warm_new = workload_plan(wl, prompts, short_warmup)
    wres: dict = {"tokens_per_run": tokens, "runs": repeats, "warmup": "short" if short_warmup else "full",
                  "times_s": []}
    if wl in be.sequential:
        wres["mode"] = "sequential"
    try:
        t = time.perf_counter()
        be.generate(warm, warm_new)
        log(f"{name} {wl}: warm-up{' (short)' if short_warmup else ''} {time.perf_counter() - t:.2f} s")
        if hasattr(be, "settle"):
            be.settle(name, wl)
        for r in range(1, repeats + 1):
            ps = make(r)
            t = time.perf_counter()
            outs = be.generate(ps, new)
            dt = time.perf_counter() - t
            wres["times_s"].append(dt)
            if be.last_prefill_s is not None:
                wres.setdefault("prefill_s", []).append(be.last_prefill_s)
            log(f"{name} {wl}: run {r}/{repeats} {dt:.2f} s = {tokens / dt:.1f} tok/s")
            if wl in ("W1", "W2"):
                wres.setdefault("outputs", {})[str(r)] = outs  # for the greedy-agreement check
        med = statistics.median(wres["times_s"])
        wres["median_s"], wres["tok_s"] = med, tokens / med
        if wl == "W1" and wres.get("prefill_s"):
            decode = statistics.median(t - p for t, p in zip(wres["times_s"], wres["prefill_s"]))
            wres["decode_only_s"], wres["decode_only_tok_s"] = decode, (new - 1) / decode
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        wres["error"] = f"{type(e).__name__}: {e}"
        log(f"{name} {wl}: FAILED: {wres['error']}")
    return wres


def run_system(name: str, args) -> dict:
    """Measure one system in this process; return a JSON-able dict."""
    column = arbor_column(args.quantization) if name == "arborlm" else name
    log(f"{column}: starting (dtype={args.dtype}, threads={args.threads})")
    res: dict = {"system": column, "dtype": args.dtype, "threads": args.threads, "workloads": {},
                 "loadavg_start": os.getloadavg()[0]}
    try:
        be = make_backend(name, args)
    except Exception as e:  # noqa: BLE001 - reported, not fatal to the parent
        traceback.print_exc()
        res["error"] = f"start-up failed: {type(e).__name__}: {e}"
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return res
    res["import_s"], res["startup_s"] = be.import_s, be.startup_s
    res.update(be.info)
    log(f"{column}: start-up {be.startup_s:.2f} s (of which imports {be.import_s:.2f} s)")
    prompts = Prompts(be.text_ids())
    res["text_tokens"], res["prompt_digest"] = len(prompts.stream), prompts.digest()
    for wl in args.workloads:
        res["workloads"][wl] = run_workload(be, column, wl, prompts, args)
    be.close()
    res["cached_tokens_total"] = be.cached_tokens
    res["loadavg_end"] = os.getloadavg()[0]
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return res


# ---- the parent ---------------------------------------------------------------------------------------
def run_child(name: str, args, quantization: str | None = None) -> dict:
    column = arbor_column(quantization) if name == "arborlm" else name
    cmd = [sys.executable, os.path.abspath(__file__), "--only", name, "--_child",
           "--workloads", ",".join(args.workloads), "--repeats", str(args.repeats), "--dtype", args.dtype,
           "--threads", str(args.threads), "--hf-warmup", args.hf_warmup]
    if args.hf_repeats_raw:
        cmd += ["--hf-repeats", args.hf_repeats_raw]
    if quantization not in (None, "default"):
        cmd += ["--quantization", quantization]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"system": column, "error": f"subprocess timed out after {args.child_timeout} s", "workloads": {}}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = time.perf_counter() - t
            if p.returncode != 0:
                res.setdefault("error", f"subprocess exited with {p.returncode}")
            return res
    how = f"was killed by signal {-p.returncode}" if p.returncode < 0 else f"exited with {p.returncode}"
    return {"system": column, "error": f"subprocess {how} and no result line", "workloads": {}}


def columns_to_run(args) -> list[tuple[str, str, str | None]]:
    """(column, system, arborlm quantization) in run order: arborlm first, it converts the GGUF if needed."""
    cols = []
    if "arborlm" in args.systems:
        cols += [(arbor_column(c), "arborlm", c) for c in args.arborlm_configs]
    return cols + [(s, s, None) for s in REFERENCES if s in args.systems]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement_pair(a: dict, h: dict) -> dict:
    """Greedy outputs of two columns on the same prompts: mean common-prefix length per workload."""
    out = {}
    for wl in ("W1", "W2"):
        ao = a.get("workloads", {}).get(wl, {}).get("outputs", {})
        ho = h.get("workloads", {}).get(wl, {}).get("outputs", {})
        runs = sorted(set(ao) & set(ho))
        if not runs:
            continue
        pref = [common_prefix(x, y) for r in runs for x, y in zip(ao[r], ho[r])]
        out[wl] = {"sequences": len(pref), "mean_common_prefix": statistics.mean(pref),
                   "min_common_prefix": min(pref), "identical": sum(p == len(x) for p, x in
                                                                     zip(pref, [x for r in runs for x in ao[r]]))}
    return out


def agreement(results: dict) -> dict:
    """Every arborlm column against each reference system, and transformers against llama.cpp."""
    cols = results["columns"]
    pairs = [(a, r) for a in cols if a.startswith("arborlm") for r in REFERENCES if r in cols]
    pairs += [("transformers", "llama.cpp")] if all(s in cols for s in REFERENCES) else []
    out = {}
    for a, r in pairs:
        g = agreement_pair(results[a], results[r])
        if g:
            out[f"{a} vs {r}"] = g
    return out


def fmt(x, spec=".1f", dash="-"):
    return dash if x is None else format(x, spec)


def ratio(a, b) -> str:
    return (fmt(a / b, ".2f") + "x") if a and b else "-"


def cell(w: dict, failed: bool, key: str = "tok_s", time_key: str = "median_s") -> str:
    if failed:
        return f"{'FAILED':>21}{'':>15}"
    tok = fmt(w.get(key)) + (" seq" if w.get("mode") == "sequential" and key == "tok_s" else "")
    runs = f"({fmt(w.get(time_key), '.2f')}, {w.get('runs', '-')})" if w.get(key) is not None else ""
    return f"{tok:>21}{runs:>15}"


def print_header(results: dict, shown: list[str], args, p) -> None:
    p()
    p(f"{' vs '.join(shown)}: dtype={args.dtype} (arborlm, transformers; llama.cpp runs the Q4_1 GGUF), "
      f"threads={args.threads}, greedy, median of runs (after 1 warm-up)")
    p(cpu_line(results["cpu"]))
    for c in shown:
        r = results[c]
        if r.get("path") is not None:
            p(f"{c} path: {path_text(r['path'])}")
        if c == "llama.cpp" and r.get("version"):
            p(f"llama.cpp: llama-cpp-python {r['version']}, {r.get('gguf')}, n_ctx {r.get('n_ctx')}, "
              f"n_batch {r.get('n_batch')}; {r.get('system_info', '')}")


def print_rows(results: dict, shown: list[str], pairs: list[tuple[str, str]], args, p) -> None:
    head = f"{'workload':<27}" + "".join(f"{c + ' tok/s':>21}{'(s/run, runs)':>15}" for c in shown)
    widths = [max(10, len(short_name(a) + short_name(r)) + 3) for a, r in pairs]
    head += "".join(f"{short_name(a) + '/' + short_name(r):>{w}}" for (a, r), w in zip(pairs, widths))
    p(head)
    p("-" * len(head))
    rows = [(LABELS[wl], wl, "tok_s", "median_s") for wl in args.workloads]
    if any(results[c].get("workloads", {}).get("W1", {}).get("decode_only_tok_s") for c in shown):
        rows.append((DECODE_ONLY_LABEL, "W1", "decode_only_tok_s", "decode_only_s"))
    for label, wl, key, time_key in rows:
        line, toks = f"{label:<27}", {}
        for c in shown:
            w = results[c].get("workloads", {}).get(wl, {})
            failed = "error" in w or bool(results[c].get("error") and not w.get("tok_s"))
            toks[c] = None if failed else w.get(key)
            line += cell(w, failed, key, time_key)
        p(line + "".join(f"{ratio(toks.get(a), toks.get(r)):>{w}}" for (a, r), w in zip(pairs, widths)))
    for key, label, spec in (("startup_s", "startup (s)", ".2f"), ("peak_rss_mb", "peak RSS (MB)", ".0f")):
        vals = {c: results[c].get(key) for c in shown}
        line = f"{label:<27}" + "".join(f"{fmt(vals[c], spec):>21}{'':>15}" for c in shown)
        p(line + "".join(f"{ratio(vals.get(a), vals.get(r)):>{w}}" for (a, r), w in zip(pairs, widths)))


def print_notes(results: dict, shown: list[str], args, p) -> None:
    p()
    p("notes:")
    p(f"  tok/s: W1 = {W1_NEW} new tokens / wall time of the generate call (prefill included); "
      f"W2 = {W2_BATCH}*{W2_NEW} / wall time; W4 = {W4_PROMPT} prompt tokens / wall time (1 new token). "
      f"Ratios are tok/s (startup, RSS: seconds, MB) of the first column over the second.")
    if "llama.cpp" in shown:
        p(f"  llama.cpp: eval / greedy-sample loop per prompt (reset() first, so no prefix is reused), exactly N "
          f"tokens, no EOS stop; 'seq' = W2's {W2_BATCH} prompts run one at a time (llama-cpp-python has no "
          f"batched generate); '{DECODE_ONLY_LABEL}' = {W1_NEW - 1} tokens / (W1 wall time - prompt eval).")
        if results["cpu"]["flags"].get("amx_bf16") and "AMX" not in results["llama.cpp"].get("system_info", "AMX"):
            p("  llama.cpp: this build has no AMX kernels although the CPU has AMX (its AMX matmul segfaults on "
              "these machines, see the docstring), so its prefill runs on AVX512-VNNI; arborlm and transformers "
              "get AMX through oneDNN.")
    p("  startup: with torch already imported, import + arborlm Engine() / transformers from_pretrained "
      "+ tokenizer, until the answer of a 1-token request (arborlm's Engine() imports transformers lazily, so "
      "both include that import); llama.cpp: import llama_cpp + Llama(gguf) + a 1-token request. Module "
      "imports before construction: " + ", ".join(f"{c} {fmt(results[c].get('import_s'), '.2f')} s" for c in shown)
      + ".")
    p("  peak RSS: ru_maxrss of each system's own subprocess (llama.cpp's never imports torch)."
      if not args.in_process else "  peak RSS: ru_maxrss of this process.")
    for c in shown:
        ws = results[c].get("workloads", {})
        used = ", ".join(f"{wl}={ws[wl]['runs']}{' (short warm-up)' if ws[wl].get('warmup') == 'short' else ''}"
                         for wl in args.workloads if wl in ws)
        if used:
            p(f"  timed runs {c}: {used}")
    if "transformers" in shown and results["transformers"].get("workloads"):
        p("  (transformers W2/W4 default to 1 timed run after a short warm-up: they are slow on CPUs; change "
          "with --hf-repeats / --hf-warmup full)")
    for c in results["columns"]:
        if results[c].get("skipped"):
            p(f"  {c}: skipped: {results[c]['skipped']}")
    for c in shown:
        r = results[c]
        if r.get("prompt_digest"):
            p(f"  {c}: text = {r['text_tokens']} tokens, digest {r['prompt_digest']}")
        if r.get("loadavg_end") is not None:
            p(f"  {c}: 1-min load average {r['loadavg_start']:.2f} at start, {r['loadavg_end']:.2f} at end "
              f"({os.cpu_count()} CPUs; above ~{args.threads} means other processes competed for the cores)")
        if r.get("cached_tokens_total"):
            p(f"  {c}: prefix cache hit on {r['cached_tokens_total']} prompt tokens in total")
    ag = results.get("agreement") or {}
    if ag:
        p("  greedy agreement (bf16 rounding, and llama.cpp's 4-bit weights / 8-bit activations, make some "
          "divergence normal):")
    for pair, g in ag.items():
        for wl, a in g.items():
            p(f"    {pair} {wl}: {a['identical']}/{a['sequences']} outputs identical, "
              f"mean common prefix {a['mean_common_prefix']:.1f} tokens (min {a['min_common_prefix']})")


def problems(results: dict, shown: list[str]) -> list[str]:
    out = []
    for c in shown:
        r = results[c]
        if r.get("error"):
            out.append(f"{c}: {r['error']}")
        for wl, w in r.get("workloads", {}).items():
            if w.get("error"):
                out.append(f"{c} {wl}: {w['error']}")
    d = {results[c].get("prompt_digest") for c in shown if results[c].get("prompt_digest")}
    if len(d) > 1:
        out.append("the systems tokenised the prompt text differently (digests differ)")
    return out


def print_table(results: dict, args, file=sys.stdout) -> None:
    shown = [c for c in results["columns"] if not results[c].get("skipped")]
    pairs = [(a, r) for a in shown if a.startswith("arborlm") for r in REFERENCES if r in shown]
    p = lambda *a: print(*a, file=file)  # noqa: E731
    print_header(results, shown, args, p)
    print_rows(results, shown, pairs, args, p)
    print_notes(results, shown, args, p)
    found = problems(results, shown)
    if found:
        p("PROBLEMS:")
        for x in found:
            p(f"  {x}")


def csv_list(ap, flag: str, raw: str, allowed, aliases=None) -> list[str]:
    items = [w.strip() for w in raw.split(",") if w.strip()]
    items = [(aliases or {}).get(w, w) for w in items]
    bad = [w for w in items if w not in allowed]
    if bad or not items:
        ap.error(f"{flag}: unknown {bad}; choose from {','.join(allowed)}")
    return list(dict.fromkeys(items))  # de-duplicated, in order


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--workloads", nargs="+", default=["W1,W2,W4"],
                    help="subset of W1,W2,W4, comma- or space-separated (W3 = the old name of W4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per workload after one warm-up (default 3)")
    ap.add_argument("--hf-repeats", dest="hf_repeats_raw", default=None,
                    help="timed transformers runs: an int for all workloads, or e.g. 'W1=3,W2=1,W4=1' "
                         "(default: --repeats for W1, 1 for W2/W4)")
    ap.add_argument("--hf-warmup", choices=("short", "full"), default="short",
                    help="transformers warm-up for W2/W4: 'short' (4 prompts x 8 tokens / 256-token prefill) "
                         "or 'full' (the workload itself); W1 always warms up in full (default short)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--threads", type=int, default=2,
                    help="torch intra-op threads for arborlm and transformers, n_threads for llama.cpp (default 2)")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all; llama.cpp is skipped "
                         f"with a note when llama-cpp-python is not installed)")
    ap.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                    help="arborlm: pass Engine(quantization=...); not passed at all unless given")
    ap.add_argument("--arborlm-configs", default=None,
                    help="run arborlm once per listed config, each its own column: 'default' (the engine's "
                         "default) or none|int8|int4, e.g. 'default,none' (default: just --quantization)")
    ap.add_argument("--only", choices=SYSTEMS, help="measure one system, in this process")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout "
                                                        "(the table then goes to stderr)")
    ap.add_argument("--child-timeout", type=float, default=3600, help="seconds per system subprocess")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_engine-text", dest="engine_text", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workloads = csv_list(ap, "--workloads", ",".join(args.workloads).upper(), ALL_WORKLOADS, WORKLOAD_ALIASES)
    args.systems = csv_list(ap, "--systems", args.systems.lower(), SYSTEMS)
    if args.arborlm_configs is not None and args.quantization is not None:
        ap.error("give --quantization or --arborlm-configs, not both")
    configs = ("default",) + QUANTIZATIONS
    args.arborlm_configs = (csv_list(ap, "--arborlm-configs", args.arborlm_configs.lower(), configs)
                            if args.arborlm_configs else [args.quantization or "default"])
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    args.hf_repeats = None
    if args.hf_repeats_raw:
        try:
            if "=" in args.hf_repeats_raw:
                args.hf_repeats = {WORKLOAD_ALIASES.get(k.strip().upper(), k.strip().upper()): int(v) for k, v in
                                   (kv.split("=") for kv in args.hf_repeats_raw.split(","))}
            else:
                args.hf_repeats = {"*": int(args.hf_repeats_raw)}
        except ValueError:
            ap.error("--hf-repeats: an int, or W1=N,W2=N,W4=N")
        if any(v < 1 for v in args.hf_repeats.values()):
            ap.error("--hf-repeats must be >= 1")
    args.in_process = args.only is not None
    return args


def strip_outputs(results: dict) -> dict:
    clean = json.loads(json.dumps(results))
    for c in clean.get("columns", []):
        for w in clean.get(c, {}).get("workloads", {}).values():
            w.pop("outputs", None)
    return clean


def llama_cpp_missing() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp is not importable (pip install llama-cpp-python)"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine_text:
        print(TEXT_TAG + json.dumps(engine_text()), flush=True)
        return 0
    if args._child:
        res = run_system(args.only, args)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    t0 = time.perf_counter()
    results: dict = {"cpu": cpu_info(), "columns": []}
    if args.only:
        column = arbor_column(args.quantization) if args.only == "arborlm" else args.only
        results["columns"].append(column)
        results[column] = run_system(args.only, args)
    else:
        for column, system, quantization in columns_to_run(args):
            results["columns"].append(column)
            if system == "llama.cpp" and llama_cpp_missing():
                results[column] = {"system": column, "skipped": llama_cpp_missing(), "workloads": {}}
                log(f"{column}: skipped: {results[column]['skipped']}")
                continue
            results[column] = run_child(system, args, quantization)
            log(f"{column}: done in {results[column].get('wall_s', 0):.0f} s")
        results["agreement"] = agreement(results)
    results["total_s"] = time.perf_counter() - t0
    out = sys.stderr if args.json else sys.stdout
    print_table(results, args, file=out)
    print(f"total benchmark time {results['total_s']:.0f} s", file=out)
    if args.json:
        print(json.dumps(strip_outputs(results)))
    failed = any(results[c].get("error") or any("error" in w for w in results[c].get("workloads", {}).values())
                 for c in results["columns"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
