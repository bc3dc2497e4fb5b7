"""The prompt encoding of one request at full UMT5-XXL width (CPU): ours vs upstream's way, side by side in one run.

  upstream's way  each text alone, padded to 512 tokens with its mask, computed in the checkpoint's bf16 (upstream's
                  T5EncoderModel with t5_cpu), the prompt and the negative prompt on every request
  ours            wan22.runtime.text_encoder.PromptEncoder: the real tokens only, fp32 compute over the bf16 weights where the CPU
                  (as oneDNN may use it) has no native bf16 matmul instructions, else bf16 (`ours_compute`, and
                  `compute_reason` says why); a first request (nothing cached) and a second one with a new prompt
                  (the negative prompt comes from the cache)

The weights are random at the real width (d_model 4096, 64 heads, d_ff 10240, 32 relative-position buckets) with
`blocks` of UMT5-XXL's 24 blocks: a block costs the same at any depth, so the times are scaled by 24/blocks (said so
in the result). The vocabulary is cut to 4096 rows (a lookup costs the same at any size). The real UMT5 tokenizer is
not on this machine: token counts are estimated, generously (1.3 tokens per English word, 1 per character of the
Chinese negative prompt, plus EOS), and fed as ids.

Embeddings: `max_abs_diff` is ours against the exact encode of the same bf16 weights (padded to 512, fp32
compute): what trimming and the compute dtype change; `upstream_way_max_abs_diff` is upstream's bf16 way against
that same exact encode, `ours_vs_upstream_way_max_abs_diff` the two against each other.

CPU classes: which dtype is fast depends on the CPU's matmul instructions (AMX: bf16 several times faster than
fp32; AVX-512 with BF16 but no AMX: bf16 much slower than with AMX; no BF16 at all: bf16 matmuls emulated, many times
slower than fp32). Besides this CPU, each class this CPU can stand in for is measured in a child process with
oneDNN (torch's CPU matmuls) limited to that class's instructions (`ONEDNN_MAX_CPU_ISA`): emulated on this machine,
said so in the result; `matmul_gflops` shows what bf16 and fp32 matmuls ran at there (measured to report, never to
decide). Where they do not show what that class's matmuls do (`faithful_emulation` false, `emulation_check` says
what was expected), the cap does not make this CPU behave like that class: the row is reported, not failed.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import zlib
from typing import Dict, List, Optional

from .common import REPO, log, write_result

FULL_BLOCKS = 24
GOAL = {"speedup": 5.0, "max_abs_diff": 1e-3}
# (the CPUs of that class, the oneDNN ISA cap that emulates it, the bf16 instruction this CPU needs to stand in, what
# that class's matmuls do, whether the capped matmul rates show it given this CPU's own)
CPU_CLASSES = (
    ("AVX-512 with BF16, no AMX (e.g. AMD EPYC Zen 4, Intel Cooper Lake)", "AVX512_CORE_BF16", "amx_bf16",
     "bf16 matmuls slower than with AMX", lambda capped, own: capped["bf16"] < own["bf16"]),
    ("AVX-512 without BF16 (e.g. Intel Ice Lake, Cascade Lake)", "AVX512_CORE", "avx512_bf16",
     "bf16 matmuls slower than fp32", lambda capped, own: capped["bf16"] < capped["fp32"]),
    ("AVX2, no AVX-512 (e.g. AMD EPYC Zen 2/3, many RunPod hosts)", "AVX2", "avx512_bf16",
     "bf16 matmuls slower than fp32", lambda capped, own: capped["bf16"] < capped["fp32"]),
)


class EstimatedTokenizer:
    """UMT5-sized token lists without the UMT5 tokenizer: the estimated count, deterministic ids, EOS (1) last."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    @staticmethod
    def count(text: str) -> int:
        words = len(re.findall(r"[A-Za-z0-9']+", text))
        other = len(re.findall(r"[^\sA-Za-z0-9']", text))  # CJK characters and punctuation: one each
        return min(round(1.3 * words) + other, 511) + 1

    def token_lists(self, texts: List[str]) -> List[List[int]]:
        out = []
        for text in texts:
            seed = zlib.crc32(text.encode())
            out.append([2 + (seed + 7919 * i) % (self.vocab - 2) for i in range(self.count(text) - 1)] + [1])
        return out


def build_encoder(blocks: int, width: Dict[str, int]):
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from wan22.checkpoints.configs import load_config

    config = load_config("umt5_xxl_encoder.json")
    config.update(num_layers=blocks, num_decoder_layers=blocks, **width)
    torch.manual_seed(0)
    return UMT5EncoderModel(UMT5Config(**config)).to(torch.bfloat16).eval()


def matmul_gflops() -> Dict[str, float]:
    """What a [128, 4096] x [4096, 4096] matmul runs at in bf16 and in fp32 here (best of 3)."""
    import torch

    rates = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        x, w = torch.randn(128, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        x @ w
        best = min(timed(lambda: x @ w)[0] for _ in range(3))
        rates[name] = round(2 * 128 * 4096 * 4096 / best / 1e9, 1)
    return rates


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(blocks: int, quick: bool) -> Dict[str, object]:
    """One request's encode, ours and upstream's way, on this process's CPU (as oneDNN sees it)."""
    import torch

    from wan22.request import spec
    from wan22.pipeline import UPSTREAM_NEGATIVE_PROMPT
    from wan22.runtime.text_encoder import TEXT_LEN, PromptEncoder, clean_prompt, computing_in, cpu_has_fast_bf16

    width = (dict(vocab_size=4096, d_model=512, d_kv=64, num_heads=8, d_ff=1280) if quick else
             dict(vocab_size=4096, d_model=4096, d_kv=64, num_heads=64, d_ff=10240))
    log(f"t5: UMT5 encoder, {blocks} of {FULL_BLOCKS} blocks at d_model {width['d_model']} (random bf16 weights)")
    model = build_encoder(blocks, width)
    tokenizer = EstimatedTokenizer(width["vocab_size"])
    prompt = spec.default("prompt")
    second_prompt = prompt.replace("cat", "dog").replace("sunglasses", "a scarf")
    counts = {"prompt": tokenizer.count(clean_prompt(prompt)), "negative_prompt": tokenizer.count(clean_prompt(UPSTREAM_NEGATIVE_PROMPT))}

    def padded(text: str, compute=None) -> torch.Tensor:
        tokens = tokenizer.token_lists([clean_prompt(text)])[0]
        ids = torch.tensor([tokens + [0] * (TEXT_LEN - len(tokens))])
        mask = (torch.arange(TEXT_LEN) < len(tokens)).long()[None]
        with torch.no_grad():
            if compute is None:
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            else:
                with computing_in(model, compute):
                    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden[0, : len(tokens)].float()

    scale = FULL_BLOCKS / blocks
    fast_bf16, why = cpu_has_fast_bf16()
    upstream_s, upstream = timed(lambda: [padded(prompt), padded(UPSTREAM_NEGATIVE_PROMPT)])
    log(f"t5: upstream's way {upstream_s:.1f} s for {blocks} blocks")
    encoder = PromptEncoder(tokenizer, model, torch.device("cpu"))
    ours_s, ours = timed(lambda: encoder.encode([prompt, UPSTREAM_NEGATIVE_PROMPT]))
    repeat_s, _ = timed(lambda: encoder.encode([second_prompt, UPSTREAM_NEGATIVE_PROMPT]))
    log(f"t5: ours {ours_s:.1f} s (next request {repeat_s:.1f} s)")
    _, exact = timed(lambda: [padded(prompt, torch.float32), padded(UPSTREAM_NEGATIVE_PROMPT, torch.float32)])
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, exact))
    upstream_diff = max(float((a - b).abs().max()) for a, b in zip(upstream, exact))
    ours_vs_upstream = max(float((a - b).abs().max()) for a, b in zip(ours, upstream))
    summary = {
        "ours_s": round(ours_s * scale, 2), "upstream_way_s": round(upstream_s * scale, 2),
        "speedup": round(upstream_s / ours_s, 2), "next_request_s": round(repeat_s * scale, 2),
        "next_request_speedup": round(upstream_s / repeat_s, 2),
        "max_abs_diff": diff, "upstream_way_max_abs_diff": upstream_diff, "ours_vs_upstream_way_max_abs_diff": ours_vs_upstream,
        "tokens": counts, "padded_to": TEXT_LEN, "cpu_has_fast_bf16": fast_bf16,
        "ours_compute": "bf16" if fast_bf16 else "fp32 over bf16 weights", "compute_reason": why,
        "blocks_run": blocks, "scaled_to_blocks": FULL_BLOCKS, "width": width, "threads": torch.get_num_threads(),
        "matmul_gflops": matmul_gflops(),
    }
    summary["meets_goal"] = summary["speedup"] >= GOAL["speedup"] and diff <= GOAL["max_abs_diff"]
    return summary


def measure_emulated(isa: str, blocks: int, quick: bool) -> Dict[str, object]:
    """`measure` in a child process whose oneDNN uses at most `isa` (the cap must be set before torch loads)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "bench.t5", "--blocks", str(blocks)] + (["--quick"] if quick else [])
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)  # its progress: stderr, live
    if done.returncode != 0:
        raise RuntimeError(f"the T5 benchmark with ONEDNN_MAX_CPU_ISA={isa} exited with {done.returncode} (its output is above)")
    return json.loads(done.stdout)


def run(blocks: int = 2, results_dir=None, quick: bool = False) -> Dict[str, object]:
    from wan22.runtime.text_encoder import cpu_bf16_instructions

    summary = measure(blocks, quick)
    have = cpu_bf16_instructions()
    summary["cpu_classes"] = []
    for cpus, isa, needs, behaviour, shows in CPU_CLASSES:
        if needs not in have:
            log(f"t5: {cpus}: not emulated (this CPU lacks {needs}, so it is already that class or below)")
            continue
        log(f"t5: {cpus}, emulated (ONEDNN_MAX_CPU_ISA={isa})")
        c = {"cpu": cpus, "emulated_with": f"ONEDNN_MAX_CPU_ISA={isa}", **measure_emulated(isa, blocks, quick)}
        c.update(emulation_check=behaviour, faithful_emulation=shows(c["matmul_gflops"], summary["matmul_gflops"]))
        if not c["faithful_emulation"]:
            log(f"t5: {cpus}: not a faithful emulation on this CPU (that class has {behaviour}; here "
                f"bf16/fp32 {c['matmul_gflops']['bf16']:g}/{c['matmul_gflops']['fp32']:g} GFLOP/s with the cap, "
                f"{summary['matmul_gflops']['bf16']:g}/{summary['matmul_gflops']['fp32']:g} without)")
        summary["cpu_classes"].append(c)
    data = {"summary": summary, "goal": GOAL, "note": __doc__.split("\n\n", 1)[1].strip()}
    write_result("t5_encode", data, results_dir)
    return data


def report(data: Dict[str, object]) -> List[str]:
    s = data["summary"]
    scaled = f"{s['blocks_run']} of {s['scaled_to_blocks']} blocks run, times scaled"
    lines = [f"T5 encode, one request ({s['tokens']['prompt']} + {s['tokens']['negative_prompt']} tokens; {scaled}; "
             f"goal >= {GOAL['speedup']:g}x, embeddings within {GOAL['max_abs_diff']:g} of the exact encode):"]
    for cpu, c in [("this CPU", s)] + [(f"{c['cpu']} [emulated: {c['emulated_with']}]", c) for c in s["cpu_classes"]]:
        if not c.get("faithful_emulation", True):
            cpu += f" [not a faithful emulation on this CPU: that class has {c['emulation_check']}, these rates do not]"
        lines += [
            f"  {cpu}, bf16/fp32 matmul {c['matmul_gflops']['bf16']:g}/{c['matmul_gflops']['fp32']:g} GFLOP/s: "
            f"upstream's way (padded to {c['padded_to']}, bf16) {c['upstream_way_s']:.1f} s, ours ({c['ours_compute']}) "
            f"{c['ours_s']:.1f} s: {c['speedup']:.1f}x; next request (negative prompt cached) {c['next_request_s']:.1f} s: "
            f"{c['next_request_speedup']:.1f}x",
            f"    ours computes in {c['ours_compute']}: {c['compute_reason']}",
            f"    embeddings vs the exact encode: ours max abs diff {c['max_abs_diff']:.2e}, upstream's way "
            f"{c['upstream_way_max_abs_diff']:.2e} (ours vs upstream's way {c['ours_vs_upstream_way_max_abs_diff']:.2e}); "
            f"goal {'met' if c['meets_goal'] else 'not met'}",
        ]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """`measure` alone: its progress on stderr, its summary as JSON on stdout (what `measure_emulated` runs)."""
    import argparse

    parser = argparse.ArgumentParser(description="One T5 measurement on this process's CPU (see `make bench`).")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):
        summary = measure(args.blocks, args.quick)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
