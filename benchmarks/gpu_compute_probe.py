"""Time one ResNet-50 training step on one GPU, the compute input of the 8-GPU projection
(``--compute-s`` of ``python -m secondorder.scaling project``)::

    python -m benchmarks.gpu_compute_probe --out benchmarks/results/scaling/resnet50_h200_probe.json

The model is the project's ``build_model("resnet50")``; bf16 autocast, channels-last, 256 images
of 224x224 per step, momentum SGD; forward + backward and the optimizer update are timed apart
with CUDA events (median of the timed steps after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from secondorder.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default="probe.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = build_model("resnet50", num_classes=1000).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(args.batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    compute, update = [], []
    for i in range(args.warmup + args.steps):
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        middle.record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= args.warmup:
            compute.append(start.elapsed_time(middle) / 1e3)
            update.append(middle.elapsed_time(end) / 1e3)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "batch": args.batch,
        "compute_s": statistics.median(compute),
        "optimizer_s": statistics.median(update),
        "images_per_s": args.batch / (statistics.median(compute) + statistics.median(update)),
        "gradient_bytes": 4 * sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
