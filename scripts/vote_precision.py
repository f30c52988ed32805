"""How often bfloat16 arithmetic changes a pixel's vote (its arg-max class), by class count.

Random ReLU features (2048 channels, 32 x 49 pixels, ResNet-50's final map) and a random classifier.
Prints, per class count: the share of pixels whose two best classes tie once the logits are rounded
to bfloat16, and the share whose vote differs from the float64 vote of the unrounded inputs when
(a) the logits are rounded to bfloat16 (F.linear under autocast) or (b) kept in the float32 they are
accumulated in (what dense_logits.pixel_logits does). Accumulation is emulated in float64 on the CPU.

    python scripts/vote_precision.py [--classes 100,1000,10000]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="100,1000,10000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(args.seed)
    features = torch.randn(32 * 49, 2048, generator=generator, dtype=torch.float64).relu()
    print("classes  ties_at_max_bf16  differ_bf16_logits  differ_fp32_logits")
    for num_classes in (int(c) for c in args.classes.split(",")):
        weight = torch.randn(num_classes, 2048, generator=generator, dtype=torch.float64) * 0.02
        bias = torch.randn(num_classes, generator=generator, dtype=torch.float64) * 0.01
        exact_votes = (features @ weight.T + bias).argmax(1)
        products = features.to(torch.bfloat16).double() @ weight.to(torch.bfloat16).double().T
        bf16_logits = (products + bias.to(torch.bfloat16).double()).to(torch.bfloat16).float()  # autocast's F.linear
        accumulated = products + bias.float().double()  # pixel_logits: the bias added in float32
        best_two = bf16_logits.topk(2, dim=1).values
        ties = (best_two[:, 0] == best_two[:, 1]).double().mean().item()
        differ_bf16 = (bf16_logits.argmax(1) != exact_votes).double().mean().item()
        differ_fp32 = (accumulated.float().argmax(1) != exact_votes).double().mean().item()
        print(f"{num_classes:7d}  {ties:16.4f}  {differ_bf16:18.4f}  {differ_fp32:18.4f}")


if __name__ == "__main__":
    main()
