"""make demo: the shipped workflow through a real ComfyUI on tiny random weights -> demo_out/wan22_demo.mp4.

Builds a tiny upstream-layout model set (wan22.testing.tiny, cached in .cache/demo_models), starts ComfyUI with this
node pack (headless.server), runs workflows/api/wan22_i2v_a14b.json through the headless runner (the same
code path as the wan22-i2v CLI and the RunPod worker), downloads the MP4 and stops the server.

    python -m scripts.demo [--image IMG] [--size 128*128] [--frame-num 9] [--steps 4] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def demo_image(path: Path) -> Path:
    from PIL import Image

    w, h = 160, 96
    img = Image.new("RGB", (w, h))
    img.putdata([(int(255 * x / w), int(255 * y / h), 128) for y in range(h) for x in range(w)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def main(argv=None) -> int:
    from headless.cli import ProgressBar
    from headless.run import Hooks, run
    from headless.server import start_comfyui

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", help="input image (default: a generated gradient)")
    ap.add_argument("--prompt", default="A small cat walks slowly across the green field at sunset.")
    ap.add_argument("--size", default="128*128")
    ap.add_argument("--frame-num", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(REPO / "demo_out" / "wan22_demo.mp4"))
    ap.add_argument("--models", help="model folder (default: tiny random weights)")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    work = out.parent / "comfyui"
    image = Path(args.image) if args.image else demo_image(out.parent / "demo_input.png")
    if args.models:
        models = Path(args.models)
    else:
        from wan22.testing.tiny import cached_tiny_model_set

        models = cached_tiny_model_set(REPO / ".cache" / "demo_models" / "upstream")
    print("starting ComfyUI ...", flush=True)
    server = start_comfyui(models_dir=models, work_dir=work, log_path=work / "comfyui.log")
    try:
        print(f"ComfyUI at {server.url} (log {server.log_path})", flush=True)
        result = run({"image": str(image), "prompt": args.prompt, "size": args.size, "frame_num": args.frame_num,
                      "sample_steps": args.steps, "seed": args.seed}, server=server.url, out=out,
                     hooks=Hooks(on_progress=ProgressBar()), timeout=1800)
    finally:
        server.stop()
    print(json.dumps(result.to_dict(), indent=2))
    print(f"wrote {result.output_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
