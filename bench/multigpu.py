"""Several GPUs for one video, PROJECTED (no machine with several GPUs has run this project yet): seconds per video
for each layout (wan22.request.parallel_layout) from one measured GPU and the bytes the layout moves between GPUs.

  compute   the step measured on one H200 (bench/measured/h200_2026-12-04_gpu.json; an H100 computes the same),
            split evenly over the ranks: Ulysses gives each rank 1/N of the tokens for the linear layers and 1/N of
            the heads for attention, CFG-parallel one of the two passes
  transfer  per rank and step, not overlapped with compute (an upper bound): Ulysses' four all-to-alls per
            self-attention layer (Q, K, V and the output, each rank sending (N-1)/N of its tokens x dim in bf16),
            with dit_fsdp every block's weights gathered once per pass ((N-1)/N of 0.665 GiB in bf16), and the CFG
            pair's exchange of one prediction
  fixed     what runs once per video on rank 0, as on one GPU: the VAE encode and decode (measured), and T5. The
            measured T5 time is mostly its 11.4 GB moved to the GPU and back (the engine's default: T5 leaves the GPU
            after encoding); with t5_fsdp its shards stay on the GPUs, so T5 is its FLOPs at the rate the measured
            step achieved plus the all-gather of its weights

Links: NVLink 4 (H100 SXM) 450 GB/s each way; PCIe 4 x16 (RTX 4090 workers) 25 GB/s; PCIe 5 x16 (RTX 5090) 50 GB/s
(usable figures, not the signalling rate). Upstream's published figures (Wan2.2 README, I2V-A14B 720p, H100):
1 GPU 1055.9 s, 4 GPUs 290.4 s, 8 GPUs 159.0 s.

    python -m bench.multigpu        # prints the table, writes bench/results/multigpu.json
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List

from wan22.checkpoints.configs import load_config
from wan22.request.cost import video_tokens
from wan22.request.parallel_layout import ParallelLayout
from wan22.runtime.text_encoder import TEXT_LEN  # every prompt is padded to it

from .common import REPO, write_result

MEASURED = REPO / "bench" / "measured" / "h200_2026-12-04_gpu.json"
LINKS_GBPS = {"NVLink 4 (H100 SXM)": 450.0, "PCIe 5 x16 (RTX 5090)": 50.0, "PCIe 4 x16 (RTX 4090)": 25.0}
UPSTREAM_720P_H100_S = {1: 1055.9, 4: 290.4, 8: 159.0}
A14B = {"layers": 40, "dim": 5120, "block_bytes": int(0.665 * 2**30)}
LATENT_CHANNELS = 16


@dataclasses.dataclass(frozen=True)
class Measured:
    """One GPU, one resolution: seconds of a CFG step (two passes), of a 4-step step (one pass, LoRAs on), of T5
    (moved to the GPU, encoding, moved back) and of the VAE (encode and decode), which run once per video."""

    size: str
    frame_num: int
    cfg_step_s: float
    one_pass_step_s: float
    t5_s: float
    vae_s: float

    @property
    def flops_per_s(self) -> float:
        """The rate the measured CFG step computed at (two passes of expert_pass_flops)."""
        return 2 * expert_pass_flops(video_tokens(self.size, self.frame_num)) / self.cfg_step_s


def measured(resolution: str = "720p", path: Path = MEASURED) -> Measured:
    data = json.loads(path.read_text())["results"][resolution]
    whole, four = data["whole"], data["whole_4step"]  # whole ran second: T5 and the VAE warm, as on a warm worker
    return Measured(f"{data['width']}*{data['height']}", data["frames"], data["engine"]["step_s"],
                    four["denoise_s"] / four["steps"], whole["t5_s"], whole["prepare_s"] + whole["decode_s"])


def expert_pass_flops(tokens: int) -> int:
    """FLOPs of one expert forward over `tokens` video tokens and a 512-token text: per block, self-attention's four
    projections and its attention, cross-attention's query and output projections, its keys and values over the
    text and its attention, the feed-forward (2 FLOPs per multiply-add; norms and modulation left out)."""
    c = load_config("wan22_i2v_a14b_transformer.json")
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    macs = (4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * dim + 2 * TEXT_LEN * dim * dim
            + 2 * tokens * TEXT_LEN * dim + 2 * tokens * dim * c["ffn_dim"])
    return 2 * c["num_layers"] * macs


def t5_flops(prompts: int = 2) -> int:
    """FLOPs of UMT5-XXL's encoder over `prompts` prompts padded to 512 tokens (the prompt and the negative one)."""
    c = load_config("umt5_xxl_encoder.json")
    inner = c["num_heads"] * c["d_kv"]
    macs = 4 * TEXT_LEN * c["d_model"] * inner + 2 * TEXT_LEN * TEXT_LEN * inner + 3 * TEXT_LEN * c["d_model"] * c["d_ff"]
    return 2 * c["num_layers"] * prompts * macs


def t5_bytes() -> int:
    """UMT5-XXL's encoder weights in bf16: the embedding and each layer's attention and gated feed-forward."""
    c = load_config("umt5_xxl_encoder.json")
    inner = c["num_heads"] * c["d_kv"]
    return 2 * (c["vocab_size"] * c["d_model"] + c["num_layers"] * (4 * c["d_model"] * inner + 3 * c["d_model"] * c["d_ff"]))


def fixed_s(layout: ParallelLayout, m: Measured, link_gbps: float) -> float:
    """Seconds of what runs once per video: the VAE as measured; T5 as measured, or with t5_fsdp its FLOPs at the
    measured rate plus the all-gather of (N-1)/N of its weights (it never leaves the GPUs)."""
    if not layout.t5_fsdp:
        return m.t5_s + m.vae_s
    gather = t5_bytes() * (layout.ranks - 1) // layout.ranks / (link_gbps * 1e9)
    return m.vae_s + t5_flops() / m.flops_per_s + gather


def transfer_bytes_per_step(layout: ParallelLayout, size: str, frame_num: int, passes: int) -> int:
    """Bytes one rank sends per denoising step (see the module doc)."""
    n, tokens = layout.ulysses_size, video_tokens(size, frame_num)
    rank_passes = passes // layout.cfg_groups if passes > 1 else passes
    per_all_to_all = tokens * A14B["dim"] * 2 // n * (n - 1) // n
    total = A14B["layers"] * 4 * per_all_to_all * rank_passes
    if layout.dit_fsdp:
        total += A14B["layers"] * A14B["block_bytes"] * (layout.ranks - 1) // layout.ranks * rank_passes
    if layout.cfg_parallel and passes > 1:
        width, height = (int(v) for v in size.split("*"))
        total += LATENT_CHANNELS * ((frame_num - 1) // 4 + 1) * (height // 8) * (width // 8) * 4  # one fp32 prediction
    return total


def project(layout: ParallelLayout, m: Measured, steps: int, passes: int, link_gbps: float) -> Dict[str, float]:
    """Projected seconds of one video: steps x (compute + transfer) + fixed."""
    step = m.cfg_step_s if passes == 2 else m.one_pass_step_s
    splits = layout.ulysses_size * (layout.cfg_groups if passes == 2 else 1)
    compute = step / splits
    transfer = transfer_bytes_per_step(layout, m.size, m.frame_num, passes) / (link_gbps * 1e9)
    fixed = fixed_s(layout, m, link_gbps)
    return {"compute_s_per_step": round(compute, 3), "transfer_s_per_step": round(transfer, 3),
            "fixed_s": round(fixed, 2), "video_s": round(steps * (compute + transfer) + fixed, 1)}


LAYOUTS = [ParallelLayout(), ParallelLayout(cfg_parallel=True), ParallelLayout(ulysses_size=2),
           ParallelLayout(ulysses_size=4), ParallelLayout(ulysses_size=2, cfg_parallel=True),
           ParallelLayout(ulysses_size=8), ParallelLayout(ulysses_size=4, cfg_parallel=True),
           ParallelLayout(ulysses_size=8, dit_fsdp=True), ParallelLayout(ulysses_size=8, t5_fsdp=True),
           ParallelLayout(ulysses_size=8, dit_fsdp=True, t5_fsdp=True)]  # the last: upstream's own 8-GPU command


def run(results_dir=None) -> dict:
    """H100s over NVLink: whole videos. PCIe workers (4090, 5090) compute several times slower than an H100, which
    no GPU here has measured: for them only the transfer each step adds is projected."""
    m = measured()
    nvlink = LINKS_GBPS["NVLink 4 (H100 SXM)"]
    rows = []
    for layout in LAYOUTS:
        rows.append({"layout": layout.describe(), "ranks": layout.ranks, "h100_nvlink": {
                         "40_steps": project(layout, m, 40, 2, nvlink), "4_step_recipe": project(layout, m, 4, 1, nvlink)},
                     "upstream_h100_s": UPSTREAM_720P_H100_S.get(layout.ranks),
                     "pcie_transfer_s_per_cfg_step": {link: round(transfer_bytes_per_step(layout, m.size, m.frame_num, 2) / (gbps * 1e9), 2)
                                                      for link, gbps in LINKS_GBPS.items() if link.startswith("PCIe")}})
    measured_figures = {**dataclasses.asdict(m), "flops_per_s": round(m.flops_per_s / 1e12, 1) * 1e12}
    data = {"projected": True, "measured_from": str(MEASURED.relative_to(REPO)), "measured": measured_figures,
            "targets": {"40_steps_8_h100_s": 150, "4_step_8_h100_s": 25}, "rows": rows, "note": __doc__.strip()}
    write_result("multigpu", data, results_dir)
    return data


def report(data: dict) -> List[str]:
    lines = ["Several GPUs, 720p/81 frames, PROJECTED from one measured H200 (H100s over NVLink, seconds per video; "
             "PCIe workers: the transfer a CFG step adds):"]
    for row in data["rows"]:
        h100 = row["h100_nvlink"]
        upstream = f" (upstream: {row['upstream_h100_s']:g} s)" if row["upstream_h100_s"] else ""
        pcie = ", ".join(f"{link.split(' (')[0]} +{s:g} s" for link, s in row["pcie_transfer_s_per_cfg_step"].items())
        lines.append(f"  {row['layout']:<49} 40 steps {h100['40_steps']['video_s']:7.1f} s{upstream}, 4-step recipe "
                     f"{h100['4_step_recipe']['video_s']:5.1f} s | {pcie}")
    return lines


if __name__ == "__main__":
    print("\n".join(report(run())))
