"""Training throughput of the default 2D U-Net: slices per second per available device kind.

Runs a few optimizer steps on random slices (forward, Dice + BCE loss, backward, AdamW step) after
warm-up, on each device kind torch can reach here (cpu, cuda, hpu); the others print
"not available". Options: --crop 192 --base-filters 16 --depth 4 --batch 16 --steps 5 --threads N.
"""

from __future__ import annotations

import argparse
import time

import torch


def measure(
    kind: str, crop: int, base: int, depth: int, batch: int, steps: int, threads: int | None
) -> float:
    """Training slices per second on device ``kind``."""
    from trainer.devices import resolve_device
    from trainer.losses import DiceBCELoss
    from trainer.unet import UNetConfig, build_unet

    dev = resolve_device(kind, amp=True, threads=threads)
    model = build_unet(UNetConfig(1, 1, base, depth)).to(dev.device)
    opt = dev.optimizer(model.parameters(), 1e-3, 1e-4)
    loss_fn = DiceBCELoss()
    x = torch.randn(batch, 1, crop, crop, device=dev.device)
    y = (torch.rand(batch, crop, crop, device=dev.device) > 0.9).long()

    def step() -> None:
        with dev.autocast():
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dev.mark_step()
        opt.step()
        dev.mark_step()

    step()
    step()
    if kind == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if kind == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    """Print the table."""
    from trainer.devices import habana_available

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=192)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "hpu": habana_available()}
    print(
        f"2D U-Net depth {args.depth}, base {args.base_filters}, {args.crop}x{args.crop}, batch {args.batch}"
    )
    print(f"{'device':<8}{'slices/s':>12}")
    for kind, ok in available.items():
        if not ok:
            print(f"{kind:<8}{'not available':>16}")
            continue
        rate = measure(kind, args.crop, args.base_filters, args.depth, args.batch, args.steps, args.threads)
        print(f"{kind:<8}{rate:>12.1f}")


if __name__ == "__main__":
    main()
