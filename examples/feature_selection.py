"""Differentiable feature selection on scikit-learn's digits: which k of the 64 pixels to keep?

Each method learns logits over the 64 pixels jointly with a linear classifier on the
masked image: every relaxation of :func:`khot.soft_topk` at its default temperature, and a
πps sample with a straight-through gradient (:func:`khot.sample_khot`). Every selection (the
exact top-k of the learned logits) is then scored the same way: a fresh linear classifier
trained on the k pixels alone, its test accuracy. Baselines: k random pixels, and the k
pixels of highest variance. The model and the scoring are those of ``khot bench --suites
tasks`` (:mod:`khot.bench.tasks`).

    python examples/feature_selection.py [--k 8] [--seeds 3] [--tiny]

Needs scikit-learn (only for the bundled data set; nothing is downloaded).
"""

from __future__ import annotations

import argparse

from khot.bench.tasks import features, mask_methods, spread


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="pixels to keep (default 8)")
    parser.add_argument("--seeds", type=int, default=3, help="training runs per method, the mean is reported (default 3)")
    parser.add_argument("--tiny", action="store_true", help="a few steps, one seed (a smoke test)")
    args = parser.parse_args(argv)
    steps, seeds = (5, 1) if args.tiny else (300, args.seeds)
    methods = {"random pixels": "random pixels", "highest variance": "highest variance", **mask_methods()}
    print(f"digits, keep k = {args.k} of 64 pixels; test accuracy of a linear classifier on them ({seeds} seeds)")
    results = {}
    for name, mask in methods.items():
        mean, std = spread([features(mask, args.k, seed, steps) for seed in range(seeds)])
        results[name] = mean
        print(f"  {name:<24}{mean:8.3f} ± {std:.3f}")
    return results


if __name__ == "__main__":
    main()
