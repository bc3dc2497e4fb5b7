"""Several GPUs for one video, PROJECTED (no machine with several GPUs has run this project yet): seconds per video
for each layout (wan22.request.parallel_layout) from one measured GPU and the bytes the layout moves between GPUs.

  compute   the step measured on one H200 (bench/measured/h200_2026-12-04_gpu.json; an H100 computes the same),
            split evenly over the ranks: Ulysses gives each rank 1/N of the tokens for the linear layers and 1/N of
            the heads for attention, CFG-parallel one of the two passes
  transfer  per rank and step, not overlapped with compute (an upper bound): Ulysses' four all-to-alls per
            self-attention layer (Q, K, V and the output, each rank sending (N-1)/N of its tokens x dim in bf16),
            with dit_fsdp every block's weights gathered once per pass ((N-1)/N of 0.665 GiB in bf16), and the CFG
            pair's exchange of one prediction
  fixed     what runs on rank 0 as on one GPU: T5, the VAE encode and decode (measured)

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

from wan22.request.cost import video_tokens
from wan22.request.parallel_layout import ParallelLayout

from .common import REPO, write_result

MEASURED = REPO / "bench" / "measured" / "h200_2026-12-04_gpu.json"
LINKS_GBPS = {"NVLink 4 (H100 SXM)": 450.0, "PCIe 5 x16 (RTX 5090)": 50.0, "PCIe 4 x16 (RTX 4090)": 25.0}
UPSTREAM_720P_H100_S = {1: 1055.9, 4: 290.4, 8: 159.0}
A14B = {"layers": 40, "dim": 5120, "block_bytes": int(0.665 * 2**30)}
LATENT_CHANNELS = 16


@dataclasses.dataclass(frozen=True)
class Measured:
    """One GPU, one resolution: seconds of a CFG step (two passes), of a 4-step step (one pass, LoRAs on), and of
    what runs once per video (T5, VAE encode, decode)."""

    size: str
    cfg_step_s: float
    one_pass_step_s: float
    fixed_s: float


def measured(resolution: str = "720p", path: Path = MEASURED) -> Measured:
    data = json.loads(path.read_text())["results"][resolution]
    whole, four = data["whole"], data["whole_4step"]  # whole ran second: T5 and the VAE warm, as on a warm worker
    return Measured(f"{data['width']}*{data['height']}", data["engine"]["step_s"], four["denoise_s"] / four["steps"],
                    whole["t5_s"] + whole["prepare_s"] + whole["decode_s"])


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


def project(layout: ParallelLayout, m: Measured, steps: int, passes: int, link_gbps: float, frame_num: int = 81) -> Dict[str, float]:
    """Projected seconds of one video: steps x (compute + transfer) + fixed."""
    step = m.cfg_step_s if passes == 2 else m.one_pass_step_s
    splits = layout.ulysses_size * (layout.cfg_groups if passes == 2 else 1)
    compute = step / splits
    transfer = transfer_bytes_per_step(layout, m.size, frame_num, passes) / (link_gbps * 1e9)
    return {"compute_s_per_step": round(compute, 3), "transfer_s_per_step": round(transfer, 3),
            "video_s": round(steps * (compute + transfer) + m.fixed_s, 1)}


LAYOUTS = [ParallelLayout(), ParallelLayout(cfg_parallel=True), ParallelLayout(ulysses_size=2),
           ParallelLayout(ulysses_size=4), ParallelLayout(ulysses_size=2, cfg_parallel=True),
           ParallelLayout(ulysses_size=8), ParallelLayout(ulysses_size=4, cfg_parallel=True),
           ParallelLayout(ulysses_size=8, dit_fsdp=True)]


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
                     "pcie_transfer_s_per_cfg_step": {link: round(transfer_bytes_per_step(layout, m.size, 81, 2) / (gbps * 1e9), 2)
                                                      for link, gbps in LINKS_GBPS.items() if link.startswith("PCIe")}})
    data = {"projected": True, "measured_from": str(MEASURED.relative_to(REPO)), "measured": dataclasses.asdict(m),
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
        lines.append(f"  {row['layout']:<40} 40 steps {h100['40_steps']['video_s']:7.1f} s{upstream}, 4-step recipe "
                     f"{h100['4_step_recipe']['video_s']:5.1f} s | {pcie}")
    return lines


if __name__ == "__main__":
    print("\n".join(report(run())))
