"""Training throughput of the default 2D U-Net: slices per second per available device kind.

Runs a few optimizer steps on random slices (forward, Dice + BCE loss, backward, AdamW step) after
warm-up, on each device kind torch can reach here (cpu, cuda, hpu); the others print
"not available". On the CPU both memory layouts are measured in the same run, the default one and
channels last (what the trainer uses there, ``trainer.devices.DeviceInfo.memory_format``), with their
ratio. Options: --crop 192 --base-filters 16 --depth 4 --batch 16 --steps 5 --threads N.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

#: The CPU's two layouts, measured side by side: the second is the trainer's on the CPU.
CPU_LAYOUTS = {"contiguous": torch.contiguous_format, "channels last": torch.channels_last}


def measure(
    kind: str,
    crop: int,
    base: int,
    depth: int,
    batch: int,
    steps: int,
    threads: int | None,
    layout: torch.memory_format | None = None,
) -> float:
    """Training slices per second on device ``kind``, weights and batches in ``layout`` (None: the
    trainer's own for that device)."""
    from trainer.devices import resolve_device
    from trainer.losses import DiceBCELoss
    from trainer.unet import UNetConfig, build_unet

    dev = resolve_device(kind, amp=True, threads=threads)
    if layout is not None:
        dev = dataclasses.replace(dev, memory_format=layout)
    model = dev.place(build_unet(UNetConfig(1, 1, base, depth)))
    opt = dev.optimizer(model.parameters(), 1e-3, 1e-4)
    loss_fn = DiceBCELoss()
    x = torch.randn(batch, 1, crop, crop, device=dev.device).to(memory_format=dev.memory_format)
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
    print(f"{'device':<22}{'slices/s':>12}")
    for kind, ok in available.items():
        if not ok:
            print(f"{kind:<22}{'not available':>16}")
            continue
        shape = (args.crop, args.base_filters, args.depth, args.batch, args.steps, args.threads)
        if kind != "cpu":
            print(f"{kind:<22}{measure(kind, *shape):>12.1f}")
            continue
        rates = {name: measure(kind, *shape, layout=layout) for name, layout in CPU_LAYOUTS.items()}
        for name, rate in rates.items():
            print(f"{'cpu, ' + name:<22}{rate:>12.1f}")
        print(f"{'cpu, ratio':<22}{rates['channels last'] / rates['contiguous']:>11.2f}x")


if __name__ == "__main__":
    main()
